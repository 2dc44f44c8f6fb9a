//! Routes (`ecst.create_route`): a name that stands for several streams wherever a stream name
//! feeds events (`ecst.apply`, `apply_batch`, `apply_trigger`, the inbox's `stream` column,
//! `retry_dead_letters`). Each event goes to the stream the route's field selects
//! (`ecst_core::route`); an event it selects none for is a dead letter `unrouted` kept under the
//! route's name, so that a retry routes it again once the route is extended. Stream and route
//! names share one namespace.

use crate::pg::errors::raise;
use crate::pg::owner;
use crate::pg::spi;
use crate::pg::syscache::own_relation;
use ecst_core::reject::Rejection;
use ecst_core::route::Route;
use ecst_core::spec::Path;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use serde_json::Value;
use std::collections::BTreeMap;

/// The route named `name`, if there is one (read when asked: a name that is no stream).
pub fn route(name: &str) -> Option<Route> {
    // A database whose extension is not updated yet (0.2.0 and before) has no routes.
    own_relation(c"routes")?;
    let (field, streams): (String, String) = Spi::connect_mut(|client| {
        let mut rows = spi::internal::run_once(
            client,
            "SELECT field, streams::text FROM ecst.routes WHERE name = $1",
            &[name.into()],
        );
        let row = rows.next()?;
        Some((row.get(1).unwrap().unwrap(), row.get(2).unwrap().unwrap()))
    })?;
    let streams: BTreeMap<String, String> = serde_json::from_str(&streams).expect("stored routes map to names");
    Some(Route { name: name.to_string(), field: Path::parse(&field).expect("stored paths parse"), streams })
}

/// Events of one feed, split by the stream each goes to: per stream (in name order) the events'
/// positions, in feed order; and the positions of the events the route sends nowhere.
pub type Split = (BTreeMap<String, Vec<usize>>, Vec<(usize, Rejection)>);

/// Splits `payloads` by the stream `route` selects for each.
pub fn split<'p>(route: &Route, payloads: impl IntoIterator<Item = Option<&'p str>>) -> Split {
    let mut streams: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut unrouted = Vec::new();
    for (i, payload) in payloads.into_iter().enumerate() {
        match route.select(payload) {
            Ok(stream) => streams.entry(stream.to_string()).or_default().push(i),
            Err(rejection) => unrouted.push((i, rejection)),
        }
    }
    (streams, unrouted)
}

/// `ecst.create_route`: creates the route, or replaces the definition of one the caller's role
/// created (or any, for the extension's owner).
pub fn create_route(name: &str, field: &str, streams: Value) {
    let invalid =
        |message: String, hint: &str| -> ! { raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, message, Some(hint)) };
    if name.is_empty() {
        invalid("a route name must not be empty".into(), "Name the feed, e.g. the topic: 'acme.addresses'.");
    }
    Path::parse(field).unwrap_or_else(|e| invalid(format!("field: {e}"), "A dotted path in the payload, e.g. 'type'."));
    let map = match &streams {
        Value::Object(m) if !m.is_empty() => m,
        _ => invalid(
            "streams must be a non-empty JSON object mapping values to stream names".into(),
            r#"e.g. '{"com.acme.address.changed": "address", "com.acme.customer.snapshot": "customer"}'"#,
        ),
    };
    for (value, stream) in map {
        let Value::String(stream) = stream else {
            invalid(
                format!("streams: the stream for {value:?} must be a stream name (a string)"),
                "Map each value to a stream name.",
            )
        };
        if crate::stream::catalog::try_stream(stream).is_none() {
            raise(
                Code::ERRCODE_UNDEFINED_OBJECT,
                format!("route \"{name}\": stream \"{stream}\" (for {value:?}) does not exist"),
                Some("Create the streams first; SELECT name FROM ecst.streams lists them."),
            );
        }
    }
    if crate::stream::catalog::try_stream(name).is_some() {
        raise(
            Code::ERRCODE_DUPLICATE_OBJECT,
            format!("\"{name}\" is the name of a stream"),
            Some("Streams and routes share one namespace: choose another name."),
        );
    }
    require_route_owner(name, "replace");
    Spi::connect_mut(|client| {
        spi::internal::run_once(
            client,
            "INSERT INTO ecst.routes (name, field, streams) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET field = EXCLUDED.field, streams = EXCLUDED.streams",
            &[name.into(), field.into(), pgrx::JsonB(streams.clone()).into()],
        );
    });
}

/// `ecst.drop_route`: drops a route the caller's role created (or any, for the extension's
/// owner). Returns false if there was none.
pub fn drop_route(name: &str) -> bool {
    if own_relation(c"routes").is_none() {
        return false;
    }
    require_route_owner(name, "drop");
    Spi::connect_mut(|client| {
        !spi::internal::run_once(client, "DELETE FROM ecst.routes WHERE name = $1 RETURNING 1", &[name.into()])
            .is_empty()
    })
}

/// Raises 42501 unless the route does not exist, or the caller has the privileges of the role that
/// created it, or of the extension's owner.
fn require_route_owner(name: &str, action: &str) {
    let creator: Option<String> = Spi::connect_mut(|client| {
        spi::internal::run_once(client, "SELECT created_by::text FROM ecst.routes WHERE name = $1", &[name.into()])
            .next()
            .and_then(|row| row.get::<String>(1).unwrap())
    });
    let Some(creator) = creator else { return };
    let role = std::ffi::CString::new(creator.clone()).expect("role names hold no NUL");
    // SAFETY: a catalog lookup of a role by name (InvalidOid if it was dropped).
    let oid = unsafe { pg_sys::get_role_oid(role.as_ptr(), true) };
    if !(owner::is_admin() || (oid != pg_sys::InvalidOid && owner::acts_as(oid))) {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be a member of role \"{creator}\", which created route \"{name}\", to {action} it"),
            Some("Only the role that created a route (or a member of it), or the extension's owner, may change it."),
        );
    }
}
