//! `ApiJson<T>`: the JSON body extractor of every write. Checks the media type (415), the size
//! (413), the syntax (400 `malformed_json`) and the schema — unknown fields, missing fields and
//! invalid values are 400 `invalid_value` naming the field path.

use axum::extract::{FromRequest, Request};
use axum::http::header;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::BODY_LIMIT;

/// A JSON request body deserialised into `T`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: BODY_LIMIT }
            } else {
                ApiError::MalformedJson {
                    message: e.body_text(),
                }
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// The fields whose values are arrays, read from the API document's schemas (so a new array
/// field needs no edit here). serde would also read a record from an array of its field values
/// (`[]` as an empty update); the document says objects, so anywhere else an array is refused.
fn array_fields() -> &'static std::collections::BTreeSet<String> {
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    static FIELDS: std::sync::OnceLock<std::collections::BTreeSet<String>> =
        std::sync::OnceLock::new();
    FIELDS.get_or_init(|| {
        let doc = <crate::openapi::ApiDoc as utoipa::OpenApi>::openapi();
        doc.components
            .iter()
            .flat_map(|c| c.schemas.values())
            .filter_map(|schema| match schema {
                RefOr::T(Schema::Object(object)) => Some(&object.properties),
                _ => None,
            })
            .flatten()
            .filter(|(_, field)| matches!(field, RefOr::T(Schema::Array(_))))
            .map(|(name, _)| name.clone())
            .collect()
    })
}

/// The path of the first array that stands where the API expects an object, if any.
fn misplaced_array(value: &serde_json::Value, path: &str) -> Option<String> {
    match value {
        serde_json::Value::Array(_) => Some(path.to_owned()),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, v)| {
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match v {
                serde_json::Value::Array(_) if array_fields().contains(key) => None,
                _ => misplaced_array(v, &here),
            }
        }),
        _ => None,
    }
}

/// Deserialises a JSON document, mapping errors to the API's error classes.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
        if let Some(path) = misplaced_array(&value, "") {
            return Err(ApiError::InvalidField {
                message: if path.is_empty() {
                    "the body must be a JSON object, not an array".to_owned()
                } else {
                    format!("{path} must be a JSON object, not an array")
                },
                field: path,
            });
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                let field = if path == "." {
                    named_field(&message).unwrap_or_default()
                } else {
                    path
                };
                ApiError::InvalidField { field, message }
            }
            _ => ApiError::MalformedJson {
                message: inner.to_string(),
            },
        }
    })?;
    de.end().map_err(|e| ApiError::MalformedJson {
        message: e.to_string(),
    })?;
    Ok(value)
}

/// The field named in serde's "unknown field `x`" / "missing field `x`" messages.
fn named_field(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    rest.split('`').next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_routing::Backend;

    fn err(json: &str) -> ApiError {
        parse::<Backend>(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn errors_name_the_field() {
        match err(r#"{"id":"x","address":"h:0","tags":["a"]}"#) {
            ApiError::InvalidField { field, message } => {
                assert_eq!(field, "address");
                assert!(message.contains("port"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        match err(r#"{"id":"x","address":"h:1","tags":["a",""]}"#) {
            ApiError::InvalidField { field, .. } => assert_eq!(field, "tags[1]"),
            other => panic!("{other:?}"),
        }
        match err(r#"{"id":"x","address":"h:1","tags":["a"],"colour":1}"#) {
            ApiError::InvalidField { field, .. } => assert_eq!(field, "colour"),
            other => panic!("{other:?}"),
        }
        match err(r#"{"address":"h:1","tags":["a"]}"#) {
            ApiError::InvalidField { field, .. } => assert_eq!(field, "id"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(err(r#"{"id":"#), ApiError::MalformedJson { .. }));
        match err(r#"[]"#) {
            ApiError::InvalidField { field, .. } => assert_eq!(field, ""),
            other => panic!("{other:?}"),
        }
        match err(r#"{"id":"x","address":"h:1","tags":["a"],"health_check":[]}"#) {
            ApiError::InvalidField { field, message } => {
                assert_eq!(field, "health_check");
                assert!(message.contains("not an array"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse::<vhost_routing::BackendUpdate>(br#"{"tags":["a"]}"#).is_ok());
        for field in ["tags", "expected_status", "steps"] {
            assert!(
                array_fields().contains(field),
                "{field}: {:?}",
                array_fields()
            );
        }
        assert!(matches!(
            err(r#"{"id":"x","address":"h:1","tags":["a"]} trailing"#),
            ApiError::MalformedJson { .. }
        ));
    }
}
