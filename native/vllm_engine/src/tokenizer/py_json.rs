//! `tojson` as Hugging Face's chat templates see it: Python's `json.dumps(value,
//! ensure_ascii=False, indent=indent, sort_keys=sort_keys)`. Its spacing (`", "` and
//! `": "`) and its unescaped `<`/`>`/`&` differ from minijinja's own filter, and the
//! rendered prompt must be byte-identical to what transformers produces.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// The `tojson` filter.
pub(super) fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    if kwargs.has("ensure_ascii") {
        let _: bool = kwargs.get("ensure_ascii")?; // always written as UTF-8, as HF does
    }
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_value(
        &mut out,
        &value,
        &Style {
            indent,
            sort_keys: sort_keys.unwrap_or(false),
        },
        0,
    )?;
    Ok(Value::from_safe_string(out))
}

struct Style {
    indent: Option<usize>,
    sort_keys: bool,
}

fn write_value(out: &mut String, value: &Value, style: &Style, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value),
        ValueKind::String => write_string(out, value.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            let items = keys
                .into_iter()
                .map(|key| value.get_item(&key).map(|item| (key, item)))
                .collect::<Result<Vec<_>, _>>()?;
            write_container(out, ('{', '}'), &items, style, depth, |out, (key, item)| {
                write_string(out, &key.to_string());
                out.push_str(": ");
                write_value(out, item, style, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), &items, style, depth, |out, item| {
                write_value(out, item, style, depth + 1)
            })?;
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialize a {other} value"),
            ))
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    style: &Style,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        match style.indent {
            Some(width) => {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&" ".repeat(width * (depth + 1)));
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
        write_item(out, item)?;
    }
    if let Some(width) = style.indent {
        out.push('\n');
        out.push_str(&" ".repeat(width * depth));
    }
    out.push(close);
    Ok(())
}

fn write_number(out: &mut String, value: &Value) {
    if let Some(int) = value.as_i64() {
        out.push_str(&int.to_string());
        return;
    }
    match f64::try_from(value.clone()) {
        Ok(f) if f.is_nan() => out.push_str("NaN"),
        Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
        // Python writes integral floats with a trailing ".0".
        Ok(f) if f.fract() == 0.0 && f.abs() < 1e16 => out.push_str(&format!("{f:.1}")),
        Ok(f) => out.push_str(&f.to_string()),
        Err(_) => out.push_str(&value.to_string()),
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
