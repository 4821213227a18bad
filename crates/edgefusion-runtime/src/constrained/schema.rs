//! A JSON Schema compiled into the grammar the [`super::JsonMatcher`] walks.
//!
//! Supported: `type` (one or a list), `enum`, `const`, `anyOf` / `oneOf` (both generate one
//! branch), a one-schema `allOf`, `properties` / `required` / `additionalProperties`, `items` /
//! `minItems` / `maxItems`, `minLength` / `maxLength`, and local `$ref`s (`#/$defs/..`,
//! `#/definitions/..`, `#`), recursive ones included. Annotations (`title`, `description`,
//! `default`, `examples`, `format`, which JSON Schema treats as an annotation by default) are
//! ignored. A keyword that constrains values in a way the grammar cannot enforce (`pattern`,
//! `minimum`, …) is refused by name rather than silently broken.
//!
//! Objects are generated with their properties in the schema's order: every required
//! property, and optional ones where the model chooses to write them.

use std::collections::HashMap;

use serde_json::Value;

/// Index of a node in [`Grammar::nodes`].
pub type NodeId = usize;

/// What a value at one place of the document may be.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Boolean,
    Integer,
    Number,
    /// A string of `min_chars..=max_chars` characters (an escape counts as one).
    String {
        min_chars: usize,
        max_chars: Option<usize>,
    },
    /// One exact JSON text: a `const`, or one value of an `enum` (compact serialisation).
    Literal(Vec<u8>),
    /// A value of any of these nodes.
    OneOf(Vec<NodeId>),
    Array {
        items: NodeId,
        min_items: usize,
        max_items: Option<usize>,
    },
    /// An object holding these properties in this order.
    Object {
        properties: Vec<Property>,
    },
    /// An object with any keys, each value a `values`.
    Map {
        values: NodeId,
    },
}

/// One property of an [`Node::Object`].
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    /// The key as JSON text, quotes included (`"name"`).
    pub key_json: Vec<u8>,
    pub value: NodeId,
    pub required: bool,
}

/// The compiled grammar: nodes and the one the document's value must match.
#[derive(Debug, Clone, PartialEq)]
pub struct Grammar {
    pub nodes: Vec<Node>,
    pub root: NodeId,
}

/// Node of any JSON value; [`Grammar`]s always start with it and its parts.
pub const ANY: NodeId = 0;
const ANY_STRING: NodeId = 4;
/// An object with any keys and values: one of [`ANY`]'s parts.
const ANY_MAP: NodeId = 6;

/// Nesting of schemas (and `$ref` hops) followed at most while compiling.
const MAX_DEPTH: usize = 64;
/// Nodes a grammar may hold (bounds the matcher's threads, which fork at most once per node).
const MAX_NODES: usize = 4096;

/// A schema the grammar cannot be built from: where (a JSON pointer into the schema) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("schema at '{path}': {message}")]
pub struct SchemaError {
    pub path: String,
    pub message: String,
}

/// Keywords that constrain values in ways the grammar does not enforce.
const UNSUPPORTED: &[&str] = &[
    "pattern",
    "patternProperties",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "prefixItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedProperties",
    "unevaluatedItems",
    "not",
    "if",
    "then",
    "else",
];

impl Grammar {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    pub fn any_object() -> Grammar {
        Grammar {
            root: ANY_MAP,
            ..Grammar::with_any()
        }
    }

    /// Compiles `schema`; errors name the place in the schema and the rule.
    pub fn from_schema(schema: &Value) -> Result<Grammar, SchemaError> {
        let mut compiler = Compiler {
            grammar: Grammar::with_any(),
            document: schema,
            refs: HashMap::new(),
        };
        let root = compiler.compile(schema, "#", 0)?;
        let mut grammar = compiler.grammar;
        grammar.root = root;
        grammar.flatten_choices()?;
        Ok(grammar)
    }

    /// Replaces every [`Node::OneOf`]'s alternatives by the distinct non-choice nodes they
    /// reach through choices (`anyOf` of `$ref`s of `anyOf`s …), so the matcher forks once per
    /// possible value kind, never exponentially. A choice that reaches no value (a `$ref`
    /// cycle with no object or array in between) is refused.
    fn flatten_choices(&mut self) -> Result<(), SchemaError> {
        let mut flat: Vec<Option<Vec<NodeId>>> = vec![None; self.nodes.len()];
        for (id, slot) in flat.iter_mut().enumerate() {
            if !matches!(self.nodes[id], Node::OneOf(_)) {
                continue;
            }
            let mut leaves = Vec::new();
            let mut seen = vec![false; self.nodes.len()];
            let mut stack = vec![id];
            while let Some(n) = stack.pop() {
                if std::mem::replace(&mut seen[n], true) {
                    continue;
                }
                match &self.nodes[n] {
                    Node::OneOf(alternatives) => stack.extend(alternatives.iter().rev()),
                    _ => leaves.push(n),
                }
            }
            if leaves.is_empty() {
                return Err(SchemaError {
                    path: "#".into(),
                    message: "a '$ref' cycle with no object or array in between matches nothing"
                        .into(),
                });
            }
            *slot = Some(leaves);
        }
        for (node, leaves) in self.nodes.iter_mut().zip(flat) {
            if let Some(leaves) = leaves {
                *node = Node::OneOf(leaves);
            }
        }
        Ok(())
    }

    /// The nodes every grammar starts with: any value and its kinds.
    fn with_any() -> Grammar {
        let nodes = vec![
            Node::OneOf(vec![1, 2, 3, ANY_STRING, 5, ANY_MAP]),
            Node::Null,
            Node::Boolean,
            Node::Number,
            Node::String {
                min_chars: 0,
                max_chars: None,
            },
            Node::Array {
                items: ANY,
                min_items: 0,
                max_items: None,
            },
            Node::Map { values: ANY },
        ];
        Grammar { nodes, root: ANY }
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// [`push`](Self::push), refusing schemas beyond [`MAX_NODES`].
    fn push_checked(&mut self, node: Node, path: &str) -> Result<NodeId, SchemaError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(SchemaError {
                path: path.to_string(),
                message: format!(
                    "the schema is too large for constrained decoding (over {MAX_NODES} parts)"
                ),
            });
        }
        Ok(self.push(node))
    }
}

struct Compiler<'s> {
    grammar: Grammar,
    /// The whole schema, which `$ref`s point into.
    document: &'s Value,
    /// Node of each `$ref` target compiled so far (recursive references reuse it).
    refs: HashMap<String, NodeId>,
}

impl<'s> Compiler<'s> {
    fn compile(
        &mut self,
        schema: &'s Value,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        let err = |message: String| SchemaError {
            path: path.to_string(),
            message,
        };
        if depth > MAX_DEPTH {
            return Err(err(format!(
                "schemas (and '$ref's) nest deeper than {MAX_DEPTH} levels"
            )));
        }
        let depth = depth + 1;
        let map = match schema {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => return Err(err("the schema 'false' matches nothing".into())),
            Value::Object(map) => map,
            _ => return Err(err("a schema must be an object or a boolean".into())),
        };
        if let Some(reference) = map.get("$ref") {
            let Some(reference) = reference.as_str() else {
                return Err(err("'$ref' must be a string".into()));
            };
            if map
                .keys()
                .any(|k| !is_annotation(k) && k != "$ref" && k != "$defs" && k != "definitions")
            {
                return Err(err(
                    "'$ref' beside other constraining keywords is not supported".into(),
                ));
            }
            return self.reference(reference, path, depth);
        }
        for keyword in UNSUPPORTED {
            if map.contains_key(*keyword) {
                return Err(SchemaError {
                    path: format!("{path}/{keyword}"),
                    message: format!(
                        "'{keyword}' is not supported by constrained decoding (supported: type, enum, const, anyOf, oneOf, properties, required, additionalProperties, items, minItems, maxItems, minLength, maxLength, $ref)"
                    ),
                });
            }
        }
        if map.get("uniqueItems") == Some(&Value::Bool(true)) {
            return Err(SchemaError {
                path: format!("{path}/uniqueItems"),
                message: "'uniqueItems': true is not supported by constrained decoding".into(),
            });
        }
        let declared = declared_types(map, path)?;
        // Keywords that pick among values stand alone (beside annotations; `enum` and
        // `const` also beside `type`, which filters them): other keywords beside them would
        // be silently dropped, so they are refused.
        let choosing: Vec<&str> = ["const", "enum", "anyOf", "oneOf", "allOf"]
            .into_iter()
            .filter(|k| map.contains_key(*k))
            .collect();
        if let Some(&first) = choosing.first() {
            let beside_ok = |k: &str| {
                k == first
                    || is_annotation(k)
                    || k == "$defs"
                    || k == "definitions"
                    || (k == "type" && matches!(first, "const" | "enum"))
            };
            if let Some(other) = map.keys().find(|k| !beside_ok(k)) {
                return Err(SchemaError {
                    path: format!("{path}/{other}"),
                    message: format!(
                        "'{other}' beside '{first}' is not supported by constrained decoding: put it inside each branch or value"
                    ),
                });
            }
        }
        let of_declared_type = |v: &Value| {
            declared
                .as_ref()
                .is_none_or(|types| types.iter().any(|t| has_type(v, t)))
        };
        if let Some(value) = map.get("const") {
            if !of_declared_type(value) {
                return Err(SchemaError {
                    path: format!("{path}/const"),
                    message: "the 'const' value is not of the schema's 'type'".into(),
                });
            }
            return self
                .grammar
                .push_checked(Node::Literal(compact(value)), path);
        }
        if let Some(values) = map.get("enum") {
            let Some(values) = values.as_array().filter(|v| !v.is_empty()) else {
                return Err(SchemaError {
                    path: format!("{path}/enum"),
                    message: "'enum' must be a non-empty array".into(),
                });
            };
            let mut alternatives = Vec::with_capacity(values.len());
            for value in values.iter().filter(|v| of_declared_type(v)) {
                alternatives.push(
                    self.grammar
                        .push_checked(Node::Literal(compact(value)), path)?,
                );
            }
            if alternatives.is_empty() {
                return Err(SchemaError {
                    path: format!("{path}/enum"),
                    message: "no value of 'enum' is of the schema's 'type'".into(),
                });
            }
            return self.grammar.push_checked(Node::OneOf(alternatives), path);
        }
        for keyword in ["anyOf", "oneOf"] {
            if let Some(branches) = map.get(keyword) {
                let Some(branches) = branches.as_array().filter(|b| !b.is_empty()) else {
                    return Err(SchemaError {
                        path: format!("{path}/{keyword}"),
                        message: format!("'{keyword}' must be a non-empty array of schemas"),
                    });
                };
                let alternatives = branches
                    .iter()
                    .enumerate()
                    .map(|(i, b)| self.compile(b, &format!("{path}/{keyword}/{i}"), depth))
                    .collect::<Result<Vec<_>, _>>()?;
                return self.grammar.push_checked(Node::OneOf(alternatives), path);
            }
        }
        if let Some(all) = map.get("allOf") {
            return match all.as_array().map(Vec::as_slice) {
                Some([only]) => self.compile(only, &format!("{path}/allOf/0"), depth),
                _ => Err(SchemaError {
                    path: format!("{path}/allOf"),
                    message: "only an 'allOf' of exactly one schema is supported".into(),
                }),
            };
        }
        let implied = |keys: &[&str]| keys.iter().any(|k| map.contains_key(*k));
        let types: Vec<&str> = match declared {
            Some(types) => types,
            // Untyped: what the other keywords imply, else anything.
            None if implied(&["properties", "additionalProperties", "required"]) => vec!["object"],
            None if implied(&["items", "minItems", "maxItems"]) => vec!["array"],
            None if implied(&["minLength", "maxLength"]) => vec!["string"],
            None => return Ok(ANY),
        };
        let mut alternatives = Vec::with_capacity(types.len());
        for ty in types {
            let node = match ty {
                "null" => Node::Null,
                "boolean" => Node::Boolean,
                "integer" => Node::Integer,
                "number" => Node::Number,
                "string" => self.string(map, path)?,
                "array" => self.array(map, path, depth)?,
                "object" => self.object(map, path, depth)?,
                other => {
                    return Err(SchemaError {
                        path: format!("{path}/type"),
                        message: format!(
                            "unknown type '{other}' (one of null, boolean, integer, number, string, array, object)"
                        ),
                    })
                }
            };
            alternatives.push(self.grammar.push_checked(node, path)?);
        }
        Ok(match alternatives.as_slice() {
            [one] => *one,
            _ => self.grammar.push_checked(Node::OneOf(alternatives), path)?,
        })
    }

    fn reference(
        &mut self,
        reference: &str,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        if let Some(&node) = self.refs.get(reference) {
            return Ok(node);
        }
        let Some(pointer) = reference.strip_prefix('#') else {
            return Err(SchemaError {
                path: format!("{path}/$ref"),
                message: format!(
                    "only references inside the schema ('#/$defs/..') are supported, not '{reference}'"
                ),
            });
        };
        let document: &'s Value = self.document;
        let Some(target) = document.pointer(pointer) else {
            return Err(SchemaError {
                path: format!("{path}/$ref"),
                message: format!("'{reference}' points at nothing in the schema"),
            });
        };
        // Reserve the node first, so a reference back to it (recursion) finds it.
        let slot = self.grammar.push_checked(Node::OneOf(Vec::new()), path)?;
        self.refs.insert(reference.to_string(), slot);
        let compiled = self.compile(target, reference, depth)?;
        self.grammar.nodes[slot] = Node::OneOf(vec![compiled]);
        Ok(slot)
    }

    fn string(
        &mut self,
        map: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<Node, SchemaError> {
        let (min_chars, max_chars) = bounds(map, "minLength", "maxLength", path)?;
        Ok(Node::String {
            min_chars,
            max_chars,
        })
    }

    fn array(
        &mut self,
        map: &'s serde_json::Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<Node, SchemaError> {
        let items = match map.get("items") {
            None => ANY,
            Some(items) => self.compile(items, &format!("{path}/items"), depth)?,
        };
        let (min_items, max_items) = bounds(map, "minItems", "maxItems", path)?;
        Ok(Node::Array {
            items,
            min_items,
            max_items,
        })
    }

    fn object(
        &mut self,
        map: &'s serde_json::Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<Node, SchemaError> {
        let required: Vec<&str> = match map.get("required") {
            None => Vec::new(),
            Some(Value::Array(names)) => names
                .iter()
                .map(|n| {
                    n.as_str().ok_or_else(|| SchemaError {
                        path: format!("{path}/required"),
                        message: "'required' must be a list of property names".into(),
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(SchemaError {
                    path: format!("{path}/required"),
                    message: "'required' must be a list of property names".into(),
                })
            }
        };
        let properties = match map.get("properties") {
            None => None,
            Some(Value::Object(props)) => Some(props),
            Some(_) => {
                return Err(SchemaError {
                    path: format!("{path}/properties"),
                    message: "'properties' must be an object of schemas".into(),
                })
            }
        };
        let Some(properties) = properties.filter(|p| !p.is_empty()) else {
            if let Some(name) = required.first() {
                return Err(SchemaError {
                    path: format!("{path}/required"),
                    message: format!("required property '{name}' has no schema in 'properties'"),
                });
            }
            let values = match map.get("additionalProperties") {
                None | Some(Value::Bool(true)) => ANY,
                Some(Value::Bool(false)) => {
                    return Ok(Node::Object {
                        properties: Vec::new(),
                    })
                }
                Some(schema) => {
                    self.compile(schema, &format!("{path}/additionalProperties"), depth)?
                }
            };
            return Ok(Node::Map { values });
        };
        for name in &required {
            if !properties.contains_key(*name) {
                return Err(SchemaError {
                    path: format!("{path}/required"),
                    message: format!("required property '{name}' has no schema in 'properties'"),
                });
            }
        }
        let mut compiled = Vec::with_capacity(properties.len());
        for (name, schema) in properties {
            let value = self.compile(
                schema,
                &format!("{path}/properties/{}", escape_pointer(name)),
                depth,
            )?;
            compiled.push(Property {
                key_json: compact(&Value::String(name.clone())),
                value,
                required: required.contains(&name.as_str()),
            });
        }
        Ok(Node::Object {
            properties: compiled,
        })
    }
}

/// The schema's `type`: one name or a list (`None` when it has none).
fn declared_types<'v>(
    map: &'v serde_json::Map<String, Value>,
    path: &str,
) -> Result<Option<Vec<&'v str>>, SchemaError> {
    let bad = || SchemaError {
        path: format!("{path}/type"),
        message: "'type' must be a string or a non-empty list of strings".into(),
    };
    match map.get("type") {
        None => Ok(None),
        Some(Value::String(t)) => Ok(Some(vec![t.as_str()])),
        Some(Value::Array(ts)) if !ts.is_empty() => ts
            .iter()
            .map(|t| t.as_str().ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(bad()),
    }
}

/// Whether `value` is of JSON Schema type `ty` (an integer is a number whose fraction is 0).
pub(crate) fn has_type(value: &Value, ty: &str) -> bool {
    match ty {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.as_f64().is_some_and(|x| x.fract() == 0.0),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

/// `title`, `description` and other keywords that do not constrain values.
fn is_annotation(keyword: &str) -> bool {
    matches!(
        keyword,
        "title"
            | "description"
            | "default"
            | "examples"
            | "format"
            | "$schema"
            | "$id"
            | "$comment"
            | "readOnly"
            | "writeOnly"
            | "deprecated"
    )
}

/// A non-negative integer keyword (`minLength`, `maxItems`, …).
fn count(
    map: &serde_json::Map<String, Value>,
    keyword: &str,
    path: &str,
) -> Result<Option<usize>, SchemaError> {
    match map.get(keyword) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| SchemaError {
                path: format!("{path}/{keyword}"),
                message: format!("'{keyword}' must be a non-negative integer"),
            }),
    }
}

/// A `min…`/`max…` pair of count keywords: (min, default 0; max, if any), refusing max < min.
fn bounds(
    map: &serde_json::Map<String, Value>,
    min_keyword: &str,
    max_keyword: &str,
    path: &str,
) -> Result<(usize, Option<usize>), SchemaError> {
    let min = count(map, min_keyword, path)?.unwrap_or(0);
    let max = count(map, max_keyword, path)?;
    if max.is_some_and(|max| max < min) {
        return Err(SchemaError {
            path: format!("{path}/{max_keyword}"),
            message: format!("'{max_keyword}' is below '{min_keyword}' ({min})"),
        });
    }
    Ok((min, max))
}

fn compact(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A property name as a JSON-pointer segment.
fn escape_pointer(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}
