//! Routes: one feed (a topic, an inbox `stream` value) carrying several event types, each event
//! sent to the stream its type selects. A route reads one field of the payload (a dotted path from
//! its root, e.g. CloudEvents' `type`) and maps its values to stream names.

use crate::reject::{RejectCode, Rejection};
use crate::spec::Path;
use crate::version::json_type;
use serde_json::Value;
use std::collections::BTreeMap;

/// A route as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// Where the selecting value sits in the payload.
    pub field: Path,
    /// Value → stream name.
    pub streams: BTreeMap<String, String>,
}

impl Route {
    /// The stream a payload goes to, or why it goes nowhere: `invalid_json`/`not_an_object` as
    /// parsing the event would say, `unrouted` (naming the value, or its absence) otherwise.
    pub fn select(&self, payload: Option<&str>) -> Result<&str, Rejection> {
        let Some(text) = payload else {
            return Err(Rejection::new(RejectCode::InvalidJson, "the event is NULL"));
        };
        let root: Value = serde_json::from_str(text).map_err(|e| crate::event::not_json(text, &e))?;
        self.select_value(&root)
    }

    /// [`Route::select`] for a decoded payload.
    pub fn select_value(&self, root: &Value) -> Result<&str, Rejection> {
        if !root.is_object() {
            return Err(Rejection::new(
                RejectCode::NotAnObject,
                format!("an event must be a JSON object, not {}", json_type(root)),
            ));
        }
        let value = match self.field.lookup(root) {
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            None | Some(Value::Null) => {
                return Err(Rejection::new(
                    RejectCode::Unrouted,
                    format!("route {:?}: the event has no value at {}", self.name, self.field),
                ))
            }
            Some(other) => {
                return Err(Rejection::new(
                    RejectCode::Unrouted,
                    format!("route {:?}: the value at {} is {}, not a string", self.name, self.field, json_type(other)),
                ))
            }
        };
        self.streams.get(&value).map(String::as_str).ok_or_else(|| {
            Rejection::new(
                RejectCode::Unrouted,
                format!(
                    "route {:?}: no stream for {} = {:?} (extend the route with ecst.create_route, then retry)",
                    self.name, self.field, value
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route {
            name: "acme".into(),
            field: Path::parse("type").unwrap(),
            streams: [("com.acme.address.changed", "address"), ("com.acme.customer.snapshot", "customer")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_route_selects_the_stream_of_the_value() {
        assert_eq!(route().select(Some(r#"{"type": "com.acme.address.changed", "data": {}}"#)).unwrap(), "address");
        assert_eq!(route().select(Some(r#"{"type": "com.acme.customer.snapshot"}"#)).unwrap(), "customer");
    }

    #[test]
    fn a_value_without_a_stream_is_unrouted_naming_it() {
        for (payload, words) in [
            (r#"{"type": "com.acme.order.placed"}"#, "\"com.acme.order.placed\""),
            (r#"{"data": {}}"#, "no value at type"),
            (r#"{"type": null}"#, "no value at type"),
            (r#"{"type": {"a": 1}}"#, "an object, not a string"),
        ] {
            let r = route().select(Some(payload)).unwrap_err();
            assert_eq!(r.code, RejectCode::Unrouted, "{payload}");
            assert!(r.message.contains(words), "{payload}: {}", r.message);
        }
        assert_eq!(route().select(Some("not json")).unwrap_err().code, RejectCode::InvalidJson);
        assert_eq!(route().select(Some("[1]")).unwrap_err().code, RejectCode::NotAnObject);
        assert_eq!(route().select(None).unwrap_err().code, RejectCode::InvalidJson);
    }
}
