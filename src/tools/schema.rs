//! A small JSON-schema checker for tool arguments: `type` (one or a list), `properties`,
//! `required`, `additionalProperties: false`, `enum`, `items`, `minimum`/`maximum` and
//! `minLength`/`maxLength`. Keywords it does not know are ignored, so a richer schema still
//! works (the tool itself checks the rest). Messages name the argument and say what was wrong.

use serde_json::Value;

/// Why a schema itself is unusable (a manifest error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaError {
    /// Where in the schema, e.g. `properties.text.type`.
    pub path: String,
    pub message: String,
}

const TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// Checks that `schema` is a schema of tool arguments: an object whose `type`, if given, is
/// `"object"`, and whose keywords this checker reads have the right shapes.
pub fn check_schema(schema: &Value) -> Result<(), SchemaError> {
    let Value::Object(map) = schema else {
        return Err(SchemaError {
            path: String::new(),
            message: "must be a table (a JSON object) describing the arguments".into(),
        });
    };
    if let Some(t) = map.get("type")
        && t != "object"
    {
        return Err(SchemaError {
            path: "type".into(),
            message: format!("the arguments of a tool are an object: use \"object\", not {t}"),
        });
    }
    check_node(schema, "")
}

fn check_node(schema: &Value, path: &str) -> Result<(), SchemaError> {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    let bad = |key: &str, message: &str| SchemaError {
        path: at(key),
        message: message.to_string(),
    };
    let Value::Object(map) = schema else {
        return Err(SchemaError {
            path: path.to_string(),
            message: "must be a table (a JSON object)".into(),
        });
    };
    if let Some(t) = map.get("type") {
        let names: Vec<&Value> = match t {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for name in names {
            if !name.as_str().is_some_and(|n| TYPES.contains(&n)) {
                return Err(bad(
                    "type",
                    &format!("{name} is not a JSON type; use one of {}", TYPES.join(", ")),
                ));
            }
        }
    }
    if let Some(props) = map.get("properties") {
        let Value::Object(props) = props else {
            return Err(bad("properties", "must be a table of argument schemas"));
        };
        for (name, sub) in props {
            check_node(sub, &at(&format!("properties.{name}")))?;
        }
    }
    if let Some(required) = map.get("required")
        && !required
            .as_array()
            .is_some_and(|r| r.iter().all(Value::is_string))
    {
        return Err(bad("required", "must be a list of argument names"));
    }
    if let Some(items) = map.get("items") {
        check_node(items, &at("items"))?;
    }
    if let Some(e) = map.get("enum")
        && !e.is_array()
    {
        return Err(bad("enum", "must be a list of the allowed values"));
    }
    Ok(())
}

/// Checks `value` against `schema`; the first mismatch, as a sentence naming the argument.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    validate_at(schema, value, "")
}

fn describe(path: &str) -> String {
    if path.is_empty() {
        "the arguments".to_string()
    } else {
        format!("argument `{path}`")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => match value {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn validate_at(schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    let Value::Object(map) = schema else {
        return Ok(());
    };
    if let Some(t) = map.get("type") {
        let names: Vec<&str> = match t {
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            Value::String(s) => vec![s.as_str()],
            _ => Vec::new(),
        };
        if !names.is_empty() && !names.iter().any(|n| has_type(value, n)) {
            let wanted = names.join(" or ");
            return Err(if path.is_empty() && names == ["object"] {
                format!(
                    "the arguments must be a JSON object of named arguments, not {}",
                    type_name(value)
                )
            } else {
                format!(
                    "{} must be of type {wanted}, not {}",
                    describe(path),
                    type_name(value)
                )
            });
        }
    }
    if let Some(Value::Array(allowed)) = map.get("enum")
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        return Err(format!(
            "{} must be one of {}, not {value}",
            describe(path),
            list.join(", ")
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = map.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            return Err(format!("{} must be at least {min}", describe(path)));
        }
        if let Some(max) = map.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            return Err(format!("{} must be at most {max}", describe(path)));
        }
    }
    if let Value::String(s) = value {
        let chars = s.chars().count() as u64;
        if let Some(min) = map.get("minLength").and_then(Value::as_u64)
            && chars < min
        {
            return Err(format!(
                "{} must have at least {min} characters",
                describe(path)
            ));
        }
        if let Some(max) = map.get("maxLength").and_then(Value::as_u64)
            && chars > max
        {
            return Err(format!(
                "{} must have at most {max} characters",
                describe(path)
            ));
        }
    }
    if let Value::Object(obj) = value {
        let child = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            }
        };
        if let Some(Value::Array(required)) = map.get("required") {
            for name in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(name) {
                    return Err(format!("missing required argument `{}`", child(name)));
                }
            }
        }
        let props = map.get("properties").and_then(Value::as_object);
        for (name, v) in obj {
            match props.and_then(|p| p.get(name)) {
                Some(sub) => validate_at(sub, v, &child(name))?,
                None if map.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    let known: Vec<&str> = props
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    return Err(format!(
                        "unknown argument `{}`; the arguments are: {}",
                        child(name),
                        known.join(", ")
                    ));
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, map.get("items")) {
        for (i, item) in items.iter().enumerate() {
            validate_at(item_schema, item, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "text": {"type": "string", "maxLength": 5},
                "count": {"type": "integer", "minimum": 1},
                "mode": {"enum": ["a", "b"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "opt": {"type": ["string", "null"]}
            },
            "required": ["text"],
            "additionalProperties": false
        })
    }

    #[test]
    fn valid_arguments_pass() {
        let ok = json!({"text": "héllo", "count": 2, "mode": "a", "tags": ["x"], "opt": null});
        assert_eq!(validate(&schema(), &ok), Ok(()));
        assert_eq!(
            validate(&schema(), &json!({"text": "x", "count": 3.0})),
            Ok(())
        );
    }

    #[test]
    fn mismatches_name_the_argument() {
        let cases = [
            (json!({}), "missing required argument `text`"),
            (
                json!({"text": 1}),
                "argument `text` must be of type string, not an integer",
            ),
            (
                json!({"text": "toolong"}),
                "argument `text` must have at most 5 characters",
            ),
            (
                json!({"text": "x", "count": 0}),
                "argument `count` must be at least 1",
            ),
            (
                json!({"text": "x", "count": 1.5}),
                "argument `count` must be of type integer",
            ),
            (
                json!({"text": "x", "mode": "c"}),
                "argument `mode` must be one of \"a\", \"b\"",
            ),
            (
                json!({"text": "x", "tags": [1]}),
                "argument `tags[0]` must be of type string",
            ),
            (
                json!({"text": "x", "colour": 1}),
                "unknown argument `colour`",
            ),
            (
                json!("x"),
                "must be a JSON object of named arguments, not a string",
            ),
        ];
        for (value, expected) in cases {
            let got = validate(&schema(), &value);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(expected)),
                "{value}: {got:?}"
            );
        }
    }

    #[test]
    fn bad_schemas_are_reported_with_their_place() {
        assert_eq!(check_schema(&schema()), Ok(()));
        let e = check_schema(&json!({"type": "string"}));
        assert!(e.is_err_and(|e| e.path == "type"));
        let e = check_schema(&json!({"properties": {"a": {"type": "text"}}}));
        assert!(e.is_err_and(|e| e.path == "properties.a.type" && e.message.contains("text")));
        let e = check_schema(&json!({"required": "a"}));
        assert!(e.is_err_and(|e| e.path == "required"));
        assert!(check_schema(&json!([1])).is_err());
    }
}
