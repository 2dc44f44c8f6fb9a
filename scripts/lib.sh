# Shared helpers for scripts/test, scripts/demo and the integration tests. Source it.
# Everything here is idempotent: a second run reuses what is installed.

PG_MAJOR=15
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin
PGRX_VERSION=0.18.1
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt packages, cargo-pgrx and `cargo pgrx init`, each only when missing.
ensure_deps() {
    local missing=()
    for pkg in postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-contrib libclang-dev sudo; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
        log "installing cargo-pgrx $PGRX_VERSION (takes a few minutes the first time)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
    if ! grep -qs "pg$PG_MAJOR" "$HOME/.pgrx/config.toml"; then
        log "cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
        cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG"
    fi
}

# Builds and installs the extension into the system PostgreSQL. Debug build by default;
# `install_extension --release` for an optimised one. Files are staged with `cargo pgrx package`
# and put in place with `install`, which replaces each file by a new inode: a running server that
# has the old pg_ecst.so mapped keeps it (copying over it in place crashes such servers).
install_extension() {
    local profile=--debug
    [ "${1:-}" = "--release" ] && profile=""
    log "building and installing pg_ecst ${1:-}"
    local stage
    stage=$(mktemp -d /tmp/pg_ecst-package.XXXXXX)
    cargo pgrx package --pg-config "$PG_CONFIG" $profile --out-dir "$stage" >/dev/null
    (cd "$stage" && find . -type f) | while read -r f; do
        as_root install -D -m 0644 "$stage/$f" "/${f#./}"
    done
    rm -rf "$stage"
}

# A scratch cluster owned by `postgres` on a private port and socket directory, with
# pg_ecst preloaded. Usage: start_cluster DIR PORT [extra postgresql.conf lines...]
start_cluster() {
    local dir=$1 port=$2
    shift 2
    stop_cluster "$dir"
    as_root rm -rf "$dir"
    as_root mkdir -p "$dir/data" "$dir/sock"
    as_root chown -R postgres:postgres "$dir"
    sudo -u postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    {
        echo "port = $port"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$dir/sock'"
        echo "shared_preload_libraries = 'pg_ecst'"
        echo "max_worker_processes = 16"
        echo "fsync = on"
        for line in "$@"; do echo "$line"; done
    } | sudo -u postgres tee -a "$dir/data/postgresql.conf" >/dev/null
    sudo -u postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}

stop_cluster() {
    local dir=$1
    if [ -f "$dir/data/postmaster.pid" ]; then
        sudo -u postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}
