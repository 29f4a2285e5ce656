//! YAML text → a tree of nodes, each with its position, built from the parser's events.
//!
//! Why not deserialize straight into structs: serde stops at the first unknown key or
//! value of the wrong shape, so a file with a typo *and* a bad weight would show only the
//! typo. A tree lets `raw` report every such problem and still hand on what it could read.
//! It also keeps what serde can't: whether a scalar was double-quoted and its source text,
//! so that `"\xc0"` can mean the byte 0xc0 (see [`Scalar::bytes`]).
//!
//! What the tree resolves, as YAML does: aliases (`*a` is a copy of the node anchored
//! `&a`, at the alias's position) and merge keys (`<<: *base` adds the keys of `base` that
//! the mapping doesn't have). A key given twice in one mapping is a problem; the first
//! one counts. Only a syntax error stops the tree.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Marker, Parser, ScalarStyle, Span};

use super::diag::{Cx, Mark};

/// Nesting deeper than this is refused: the config's deepest key is 4 levels down, and
/// the tree is walked (and dropped) recursively.
const MAX_DEPTH: usize = 64;

/// At most this many nodes copied by aliases, so that a few lines of nested aliases (a
/// "billion laughs") can't take all memory.
const MAX_ALIASED_NODES: usize = 100_000;

#[derive(Clone, Debug)]
pub(super) struct Node {
    pub(super) at: Mark,
    pub(super) kind: Kind,
}

#[derive(Clone, Debug)]
pub(super) enum Kind {
    /// An empty value, `~` or `null` (unquoted).
    Null,
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Entries in file order; keys are nodes too (YAML allows any node as a key).
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Scalar {
    /// The value with YAML's escapes and line folding applied.
    pub(super) text: String,
    /// Double-quoted: the only style in which YAML applies `\` escapes.
    pub(super) double_quoted: bool,
    /// The exact bytes, where they differ from `text` as UTF-8: a double-quoted scalar
    /// with `\x80`…`\xff` escapes.
    exact: Option<Vec<u8>>,
}

impl Scalar {
    /// The bytes the scalar stands for: its text as UTF-8, except that each `\xNN` escape
    /// is the one byte NN. (YAML reads `\xc0` as the character U+00C0, which UTF-8 would
    /// make two bytes; in a probe's `send`/`expect` an operator writing `\xc0` means 0xc0.)
    pub(super) fn bytes(&self) -> Vec<u8> {
        self.exact
            .clone()
            .unwrap_or_else(|| self.text.clone().into_bytes())
    }
}

impl Node {
    /// The scalar's text, for keys and names; None for a collection.
    pub(super) fn text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar(s) => Some(&s.text),
            Kind::Null => Some(""),
            _ => None,
        }
    }

    /// How many nodes it holds, itself included.
    fn size(&self) -> usize {
        match &self.kind {
            Kind::Null | Kind::Scalar(_) => 1,
            Kind::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Kind::Map(entries) => {
                1 + (entries.iter())
                    .map(|(k, v)| k.size() + v.size())
                    .sum::<usize>()
            }
        }
    }
}

/// A collection being read.
enum Frame {
    Seq {
        at: Mark,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        at: Mark,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

struct Builder<'t, 'c, 'f> {
    text: &'t str,
    cx: &'c mut Cx<'f>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    aliased: usize,
    root: Option<Node>,
}

/// The document's root node; None (with the problem recorded) for a syntax error, or
/// for a file without a document (empty, or only comments).
pub(super) fn parse(cx: &mut Cx, text: &str) -> Option<Node> {
    let mut b = Builder {
        text,
        cx,
        stack: Vec::new(),
        anchors: HashMap::new(),
        aliased: 0,
        root: None,
    };
    let mut documents = 0;
    let mut parser = Parser::new_from_str(text);
    while let Some(event) = parser.next_event() {
        let (event, span) = match event {
            Ok(ok) => ok,
            Err(e) => {
                b.cx.error(Some(&mark(e.marker())), "", e.info());
                return None;
            }
        };
        if let Event::DocumentStart(..) = event {
            documents += 1;
            if documents > 1 {
                b.cx.error(
                    Some(&mark(&span.start)),
                    "",
                    "more than one YAML document (`---`): a config file holds one",
                );
                break;
            }
        }
        b.event(event, span)?;
    }
    b.root
}

fn mark(m: &Marker) -> Mark {
    Mark {
        line: m.line() as u64,
        col: m.col() as u64 + 1,
    }
}

impl Builder<'_, '_, '_> {
    /// Takes one event; None when the tree can't go on (recorded).
    fn event(&mut self, event: Event, span: Span) -> Option<()> {
        let at = mark(&span.start);
        match event {
            Event::Scalar(value, style, anchor, tag) => {
                let node = Node {
                    at,
                    kind: self.scalar(value.into_owned(), style, tag.is_some(), &span),
                };
                self.complete(node, anchor)
            }
            Event::Alias(id) => {
                let Some(anchored) = self.anchors.get(&id) else {
                    self.cx
                        .error(Some(&at), "", "an alias to an unknown anchor");
                    return None;
                };
                self.aliased += anchored.size();
                if self.aliased > MAX_ALIASED_NODES {
                    self.cx.error(
                        Some(&at),
                        "",
                        format!("aliases expand to more than {MAX_ALIASED_NODES} nodes"),
                    );
                    return None;
                }
                let node = Node {
                    at,
                    ..anchored.clone()
                };
                self.complete(node, 0)
            }
            Event::SequenceStart(_, anchor, _) => self.open(Frame::Seq {
                at,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(_, anchor, _) => self.open(Frame::Map {
                at,
                anchor,
                entries: Vec::new(),
                key: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => self.close(),
            _ => Some(()),
        }
    }

    fn scalar(&mut self, text: String, style: ScalarStyle, tagged: bool, span: &Span) -> Kind {
        let plain = matches!(style, ScalarStyle::Plain);
        if plain && !tagged && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
            return Kind::Null;
        }
        let double_quoted = matches!(style, ScalarStyle::DoubleQuoted);
        let exact = if double_quoted {
            let source = match (span.start.byte_offset(), span.end.byte_offset()) {
                (Some(a), Some(b)) => self.text.get(a..b),
                _ => None,
            };
            source.and_then(|source| exact_bytes(&text, source))
        } else {
            None
        };
        Kind::Scalar(Scalar {
            text,
            double_quoted,
            exact,
        })
    }

    fn open(&mut self, frame: Frame) -> Option<()> {
        if self.stack.len() >= MAX_DEPTH {
            let at = match &frame {
                Frame::Seq { at, .. } | Frame::Map { at, .. } => *at,
            };
            self.cx.error(
                Some(&at),
                "",
                format!("nested more than {MAX_DEPTH} levels deep"),
            );
            return None;
        }
        self.stack.push(frame);
        Some(())
    }

    fn close(&mut self) -> Option<()> {
        let (node, anchor) = match self.stack.pop()? {
            Frame::Seq { at, anchor, items } => (
                Node {
                    at,
                    kind: Kind::Seq(items),
                },
                anchor,
            ),
            Frame::Map {
                at,
                anchor,
                entries,
                ..
            } => (
                Node {
                    at,
                    kind: Kind::Map(self.merge(entries)),
                },
                anchor,
            ),
        };
        self.complete(node, anchor)
    }

    /// A finished node goes into its parent (or becomes the root).
    fn complete(&mut self, node: Node, anchor: usize) -> Option<()> {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
        Some(())
    }

    /// A mapping's entries with merge keys (`<<`) applied and repeated keys dropped.
    fn merge(&mut self, entries: Vec<(Node, Node)>) -> Vec<(Node, Node)> {
        let mut own: Vec<(Node, Node)> = Vec::with_capacity(entries.len());
        let mut merged: Vec<(Node, Node)> = Vec::new();
        for (key, value) in entries {
            if is_merge_key(&key) {
                match value.kind {
                    Kind::Map(m) => merged.extend(m),
                    Kind::Seq(items) if items.iter().all(|i| matches!(i.kind, Kind::Map(_))) => {
                        for item in items {
                            if let Kind::Map(m) = item.kind {
                                merged.extend(m);
                            }
                        }
                    }
                    _ => self.cx.error(
                        Some(&value.at),
                        "",
                        "a merge key (<<) takes a mapping or a list of mappings",
                    ),
                }
                continue;
            }
            let repeated = key.text().is_some() && own.iter().any(|(k, _)| k.text() == key.text());
            if repeated {
                self.cx.error(
                    Some(&key.at),
                    "",
                    format!(
                        "duplicate key \"{}\": each name may appear once in a mapping",
                        key.text().unwrap_or_default()
                    ),
                );
                continue;
            }
            own.push((key, value));
        }
        // The mapping's own keys win, then the first merged mapping that has the key.
        for (key, value) in merged {
            if !own
                .iter()
                .any(|(k, _)| k.text().is_some() && k.text() == key.text())
            {
                own.push((key, value));
            }
        }
        own
    }
}

fn is_merge_key(key: &Node) -> bool {
    matches!(&key.kind, Kind::Scalar(s) if s.text == "<<" && !s.double_quoted)
}

/// The bytes of a double-quoted scalar whose parsed `text` came from `source` (quotes
/// included), when they differ from `text` as UTF-8: when `\x80`…`\xff` escapes are in
/// it. None when they don't differ.
///
/// The parser has applied every escape and folded the lines; only the characters
/// U+0080…U+00FF are ambiguous (from `\xNN`, or written as themselves, `\u00NN`, `\N`,
/// `\_`). Folding never touches them, so the n-th such character of `text` is the n-th
/// thing in `source` that makes one, and that tells which of them are bytes.
fn exact_bytes(text: &str, source: &str) -> Option<Vec<u8>> {
    let makers = latin1_makers(source);
    if !makers.iter().any(|&(_, byte)| byte) {
        return None;
    }
    let mut makers = makers.into_iter();
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        if ('\u{80}'..='\u{ff}').contains(&c) {
            match makers.next() {
                Some((made, true)) if made == c => {
                    out.push(c as u32 as u8);
                    continue;
                }
                Some((made, false)) if made == c => {}
                // Not what the scan expected: keep the parser's reading.
                _ => return None,
            }
        }
        let mut buf = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    Some(out)
}

/// In a double-quoted scalar's source, each thing that makes a character in
/// U+0080…U+00FF, in order, and whether it is a `\x` escape (a byte).
fn latin1_makers(source: &str) -> Vec<(char, bool)> {
    let mut makers = Vec::new();
    let mut chars = source.chars();
    let hex = |chars: &mut std::str::Chars, n: usize| -> Option<char> {
        let digits: String = chars.take(n).collect();
        u32::from_str_radix(&digits, 16)
            .ok()
            .and_then(char::from_u32)
    };
    while let Some(c) = chars.next() {
        let (made, byte) = match c {
            '\\' => match chars.next() {
                Some('x') => (hex(&mut chars, 2), true),
                Some('u') => (hex(&mut chars, 4), false),
                Some('U') => (hex(&mut chars, 8), false),
                Some('N') => (Some('\u{85}'), false),
                Some('_') => (Some('\u{a0}'), false),
                _ => (None, false),
            },
            c => (Some(c), false),
        };
        if let Some(made) = made.filter(|m| ('\u{80}'..='\u{ff}').contains(m)) {
            makers.push((made, byte));
        }
    }
    makers
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;

    fn tree(text: &str) -> (Option<Node>, Vec<String>) {
        let mut cx = Cx::new("t.yaml");
        let root = parse(&mut cx, text);
        let problems = cx.finish().0.iter().map(|d| d.to_string()).collect();
        (root, problems)
    }

    fn value<'n>(node: &'n Node, key: &str) -> &'n Node {
        let Kind::Map(entries) = &node.kind else {
            panic!("not a map: {node:?}")
        };
        &entries
            .iter()
            .find(|(k, _)| k.text() == Some(key))
            .unwrap()
            .1
    }

    fn scalar(node: &Node) -> &Scalar {
        match &node.kind {
            Kind::Scalar(s) => s,
            other => panic!("not a scalar: {other:?}"),
        }
    }

    #[test]
    fn x_escapes_are_bytes_and_everything_else_is_utf8() {
        let (root, problems) = tree(concat!(
            "a: \"\\x00\\x04\\xc0\\x00\\x02\\x01\"\n",
            "b: \"é\\u00e9\\xe9\\N\\_\\x41\"\n",
            "c: 'é\\xc0'\n",
            "d: \"plain ascii\\r\\n\"\n",
            "e: \"folded \\xff\n  line\\\n  joined\"\n",
        ));
        assert_eq!(problems, Vec::<String>::new());
        let root = root.unwrap();
        let bytes = |k| scalar(value(&root, k)).bytes();
        assert_eq!(bytes("a"), [0x00, 0x04, 0xc0, 0x00, 0x02, 0x01]);
        let mut b = "éé".as_bytes().to_vec();
        b.push(0xe9);
        b.extend("\u{85}\u{a0}A".as_bytes());
        assert_eq!(bytes("b"), b);
        // Single quotes: no escapes at all.
        assert_eq!(bytes("c"), "é\\xc0".as_bytes());
        assert_eq!(bytes("d"), b"plain ascii\r\n");
        assert_eq!(bytes("e"), b"folded \xff linejoined");
    }

    #[test]
    fn aliases_merges_and_nulls() {
        let (root, problems) =
            tree("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\nn: *b\no:\np: ~\nq: \"\"\n");
        assert_eq!(problems, Vec::<String>::new());
        let root = root.unwrap();
        assert_eq!(value(value(&root, "m"), "x").text(), Some("1"));
        assert_eq!(value(value(&root, "m"), "y").text(), Some("3"));
        let n = value(&root, "n");
        assert_eq!(n.at, Mark { line: 5, col: 4 });
        assert_eq!(value(n, "y").text(), Some("2"));
        assert!(matches!(value(&root, "o").kind, Kind::Null));
        assert!(matches!(value(&root, "p").kind, Kind::Null));
        assert_eq!(scalar(value(&root, "q")).text, "");
    }

    #[test]
    fn problems_with_positions() {
        let (_, p) = tree("a: 1\na: 2\n");
        assert_eq!(
            p,
            ["t.yaml:2:1: duplicate key \"a\": each name may appear once in a mapping"]
        );
        let (_, p) = tree("a: 1\n---\nb: 2\n");
        assert!(
            p[0].starts_with("t.yaml:2:1: more than one YAML document"),
            "{p:?}"
        );
        let (root, p) = tree("a: [1, 2\n");
        assert!(root.is_none());
        assert_eq!(p, ["t.yaml:1:4: unclosed bracket '['"]);
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let (root, p) = tree(&deep);
        assert!(
            root.is_none() && p[0].contains("nested more than 64"),
            "{p:?}"
        );
        let laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n";
        let (root, p) = tree(laughs);
        assert!(root.is_none() && p[0].contains("aliases expand"), "{p:?}");
        assert!(tree("").0.is_none());
        assert!(tree("# only a comment\n").0.is_none());
    }

    /// Escapes as written, and the bytes they stand for.
    const ESCAPES: [(&str, &[u8]); 8] = [
        ("\\r\\n", b"\r\n"),
        ("\\t", b"\t"),
        ("\\0", b"\0"),
        ("\\\\", b"\\"),
        ("\\\"", b"\""),
        ("\\N", "\u{85}".as_bytes()),
        ("\\_", "\u{a0}".as_bytes()),
        ("\\\n    ", b""),
    ];

    /// One piece of a double-quoted scalar as written, and the bytes it stands for.
    fn piece() -> impl Strategy<Value = (String, Vec<u8>)> {
        let utf8 = |c: char| c.to_string().into_bytes();
        prop_oneof![
            any::<char>()
                .prop_filter("not special", |c| !c.is_control()
                    && !matches!(c, '"' | '\\'))
                .prop_map(move |c| (c.to_string(), utf8(c))),
            any::<u8>().prop_map(|b| (format!("\\x{b:02x}"), vec![b])),
            any::<char>()
                .prop_filter("BMP", |c| (*c as u32) < 0x10000)
                .prop_map(move |c| (format!("\\u{:04X}", c as u32), utf8(c))),
            select(&ESCAPES[..]).prop_map(|(w, b)| (w.to_string(), b.to_vec())),
        ]
    }

    proptest! {
        #[test]
        fn double_quoted_scalars_are_the_bytes_written(pieces in proptest::collection::vec(piece(), 0..12)) {
            let written: String = pieces.iter().map(|(w, _)| w.as_str()).collect();
            let bytes: Vec<u8> = pieces.iter().flat_map(|(_, b)| b.clone()).collect();
            let (root, problems) = tree(&format!("k: \"{written}\"\n"));
            prop_assert_eq!(problems, Vec::<String>::new());
            let root = root.unwrap();
            prop_assert_eq!(scalar(value(&root, "k")).bytes(), bytes);
        }
    }
}
