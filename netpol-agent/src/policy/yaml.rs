//! A YAML document tree that remembers the line of every node, built from yaml-rust2's marked
//! events, so that policy errors can name the line of the offending field.
//!
//! Bounded, because a policy file is untrusted input to a root daemon: the events are pulled one
//! by one from the parser's own (iterative) state machine — its recursive `load` would overflow
//! the stack on deeply nested input — and the tree is built on a heap stack. The builder stops at
//! the first event past [`limits::DEPTH`] levels, past [`limits::NODES`] nodes (an alias counts
//! every node it expands to, so an alias bomb stops before it is expanded), or with a tag.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, Parser, Tag},
    scanner::TScalarStyle,
};

use super::{limits, ErrorKind};

/// A node and the (1-based) line it starts on.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub line: usize,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    /// A scalar, and whether it was plain (unquoted), which decides whether `~`, `null`, `true`,
    /// `123` are typed values or strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Keys in document order.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// A plain `~`, `null`, `Null`, `NULL` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }
}

/// Why the text is not a YAML tree we accept, and where.
#[derive(Debug)]
pub(crate) struct YamlError {
    pub line: usize,
    pub kind: ErrorKind,
}

/// Parses every document of `text`; documents that are empty (or a bare null) are skipped.
pub(crate) fn parse_documents(text: &str) -> Result<Vec<Node>, YamlError> {
    if text.len() > limits::FILE_BYTES {
        let mut cut = limits::FILE_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        return Err(YamlError {
            line: text[..cut].bytes().filter(|&b| b == b'\n').count() + 1,
            kind: ErrorKind::TooLarge {
                limit: limits::FILE_BYTES,
            },
        });
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    loop {
        let (ev, mark) = parser.next_token().map_err(|e| YamlError {
            line: e.marker().line(),
            // The scanner's own bound on flow nesting (it looks ahead for keys).
            kind: if e.info() == "recursion limit exceeded" {
                ErrorKind::TooDeep {
                    limit: limits::DEPTH,
                }
            } else {
                ErrorKind::Syntax(e.info().to_owned())
            },
        })?;
        if ev == Event::StreamEnd {
            break;
        }
        builder
            .on_event(ev, mark.line())
            .map_err(|kind| YamlError {
                line: mark.line(),
                kind,
            })?;
    }
    Ok(builder.docs.into_iter().filter(|d| !d.is_null()).collect())
}

enum Open {
    Seq {
        line: usize,
        anchor: usize,
        items: Vec<Node>,
        nodes: usize,
    },
    Map {
        line: usize,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
        nodes: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    docs: Vec<Node>,
    /// Anchored nodes with the number of nodes in each.
    anchors: HashMap<usize, (Node, usize)>,
    /// Nodes so far, aliases expanded.
    nodes: usize,
}

fn tag_error(tag: Option<Tag>) -> Result<(), ErrorKind> {
    match tag {
        None => Ok(()),
        Some(t) if t.handle == "tag:yaml.org,2002:" => {
            Err(ErrorKind::Tag(format!("!!{}", t.suffix)))
        }
        Some(t) => Err(ErrorKind::Tag(format!("{}{}", t.handle, t.suffix))),
    }
}

impl Builder {
    /// Adds `node` (of `size` nodes) to the open collection, or as a document.
    fn push_node(&mut self, node: Node, size: usize) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Open::Seq { items, nodes, .. }) => {
                items.push(node);
                *nodes += size;
            }
            Some(Open::Map {
                entries,
                key,
                nodes,
                ..
            }) => {
                *nodes += size;
                match key.take() {
                    None => *key = Some(node),
                    Some(k) => entries.push((k, node)),
                }
            }
        }
    }

    /// Keeps a copy of an anchored node; the copy counts against the node limit too.
    fn remember(&mut self, anchor: usize, node: &Node, size: usize) -> Result<(), ErrorKind> {
        if anchor > 0 {
            self.count(size)?;
            self.anchors.insert(anchor, (node.clone(), size));
        }
        Ok(())
    }

    fn count(&mut self, n: usize) -> Result<(), ErrorKind> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > limits::NODES {
            return Err(ErrorKind::TooManyNodes {
                limit: limits::NODES,
            });
        }
        Ok(())
    }

    fn open(&mut self, open: Open) -> Result<(), ErrorKind> {
        self.count(1)?;
        if self.stack.len() >= limits::DEPTH {
            return Err(ErrorKind::TooDeep {
                limit: limits::DEPTH,
            });
        }
        self.stack.push(open);
        Ok(())
    }

    fn on_event(&mut self, ev: Event, line: usize) -> Result<(), ErrorKind> {
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                tag_error(tag)?;
                self.count(1)?;
                let node = Node {
                    line,
                    value: Value::Scalar {
                        text,
                        plain: style == TScalarStyle::Plain,
                    },
                };
                self.remember(anchor, &node, 1)?;
                self.push_node(node, 1);
            }
            Event::SequenceStart(anchor, tag) => {
                tag_error(tag)?;
                self.open(Open::Seq {
                    line,
                    anchor,
                    items: Vec::new(),
                    nodes: 1,
                })?;
            }
            Event::MappingStart(anchor, tag) => {
                tag_error(tag)?;
                self.open(Open::Map {
                    line,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                    nodes: 1,
                })?;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor, size) = match self.stack.pop() {
                    Some(Open::Seq {
                        line,
                        anchor,
                        items,
                        nodes,
                    }) => (
                        Node {
                            line,
                            value: Value::Seq(items),
                        },
                        anchor,
                        nodes,
                    ),
                    Some(Open::Map {
                        line,
                        anchor,
                        entries,
                        nodes,
                        ..
                    }) => (
                        Node {
                            line,
                            value: Value::Map(entries),
                        },
                        anchor,
                        nodes,
                    ),
                    None => return Ok(()),
                };
                self.remember(anchor, &node, size)?;
                self.push_node(node, size);
            }
            Event::Alias(id) => {
                let Some(&(_, size)) = self.anchors.get(&id) else {
                    return Err(ErrorKind::Syntax("alias to an unknown anchor".to_owned()));
                };
                // Counted before it is copied, so a bomb never grows.
                self.count(size)?;
                let node = self.anchors[&id].0.clone();
                self.push_node(node, size);
            }
            Event::DocumentStart => self.anchors.clear(),
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based_and_point_at_keys() {
        let docs = parse_documents("a: 1\nb:\n  - x\n  - y: 2\n---\n---\nc: d\n").unwrap();
        assert_eq!(docs.len(), 2);
        let Value::Map(entries) = &docs[0].value else {
            panic!("map expected")
        };
        assert_eq!(entries[0].0.line, 1);
        assert_eq!(entries[1].0.line, 2);
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("seq expected")
        };
        assert_eq!(items[0].line, 3);
        let Value::Map(inner) = &items[1].value else {
            panic!("map expected")
        };
        assert_eq!(inner[0].0.line, 4);
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let e = parse_documents("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(e.line >= 2, "{e:?}");
    }

    #[test]
    fn aliases_expand() {
        let docs = parse_documents("a: &x {k: v}\nb: *x\n").unwrap();
        let Value::Map(entries) = &docs[0].value else {
            panic!("map expected")
        };
        assert_eq!(entries[0].1.value, entries[1].1.value);
    }
}
