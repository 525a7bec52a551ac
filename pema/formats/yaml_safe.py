"""YAML that cannot blow up, for configs, ``key=value`` overrides and search spaces; the dotted overrides.

``yaml.safe_load`` builds an alias (``*a``) as a shared reference, so a "billion laughs" document (anchors holding
aliases of aliases) is small in memory; but whatever walks it as a tree (``repr`` in an error message,
``dataclasses.asdict``, ``deepcopy``, ``json.dumps``) expands it without bound. :func:`load_yaml` composes the
document first and refuses it, naming the source and the line, when

- it expands to more than :data:`MAX_NODES` nodes, or nests deeper than :data:`MAX_DEPTH`;
- an alias refers to a node that holds it (a recursive document);
- a mapping repeats a key, or has a key that is not a string.

Syntax errors, tags whose value does not convert (``!!int x``), NUL and other control characters, and (for files)
bytes that are not UTF-8 are ConfigErrors naming ``<source>:<line>`` too. A leading UTF-8 BOM is accepted.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pema.errors import ConfigError, named_open_errors

MAX_NODES = 100_000  # a config has ~100 nodes, a search space a few hundred
MAX_DEPTH = 64
MAX_FILE_BYTES = 16 << 20  # a config is a few KB; this bounds what is read of /dev/zero or a wrong file
_KEY_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge")


class _Loader(yaml.SafeLoader):
    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:  # int("x") for `!!int x`, an over-long integer, ...
            raise yaml.constructor.ConstructorError(None, None, str(exc).split(";")[0], node.start_mark) from None


def _at(mark, lines: bool) -> str:
    return f":{mark.line + 1}:{mark.column + 1}" if lines and mark is not None else ""


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _dotted(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(node, source: str, lines: bool, path: str) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag not in _KEY_TAGS:
            shown = repr(key.value) if isinstance(key, yaml.ScalarNode) else f"(a {key.id})"
            raise ConfigError(f"{source}{_at(key.start_mark, lines)}: the key {shown} is not a string; keys are "
                              "names (quote it if it is meant as one)")
        if key.tag == _KEY_TAGS[0] and key.value in seen:
            raise ConfigError(f"{source}{_at(key.start_mark, lines)}: {_dotted(path, key.value)} is repeated (first "
                              f"on line {seen[key.value]}); the second would silently replace the first: keep one")
        seen[key.value] = key.start_mark.line + 1


def _check_tree(root, source: str, lines: bool) -> None:
    """Expanded size and height of the node graph (shared nodes counted once per use, computed once), keys."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    open_: set[int] = set()  # the nodes on the current path: one met again is an alias of its own ancestor
    stack = [(root, False, "")]  # (node, its subtree counted, the dotted key it was first met at)
    while stack:
        node, done, path = stack.pop()
        key = id(node)
        if done:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 1 + max((height[id(k)] for k in kids), default=0)
            open_.discard(key)
            if size[key] > MAX_NODES:
                raise ConfigError(f"{source}{_at(node.start_mark, lines)}: the document expands to more than "
                                  f"{MAX_NODES:,} values through aliases (anchors '&' and aliases '*' of each other: a "
                                  "'billion laughs'); write the values out")
            if height[key] > MAX_DEPTH:
                raise ConfigError(f"{source}{_at(node.start_mark, lines)}: nested more than {MAX_DEPTH} levels deep")
            continue
        if key in size:
            continue
        open_.add(key)
        stack.append((node, True, path))
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, source, lines, path)
            kids = [(v, _dotted(path, str(k.value))) for k, v in node.value] + [(k, path) for k, _ in node.value]
        else:
            kids = [(kid, path) for kid in _children(node)]
        for kid, at in kids:
            if id(kid) in open_:
                raise ConfigError(f"{source}{_at(kid.start_mark, lines)}: an alias refers to a value that holds it "
                                  "(a recursive document)")
            if id(kid) not in size:
                stack.append((kid, False, at))


def load_yaml(text: str, source: str, *, lines: bool = True):
    """The Python value of the YAML ``text`` (None when empty); ConfigError naming ``source`` (and, with
    ``lines``, the line and column) when it is not valid YAML or is one of the documents this module refuses."""
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node, source, lines)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{source}{_at(mark, lines)}: not valid YAML ({what})") from None
    except yaml.reader.ReaderError as exc:  # a NUL or another character YAML does not allow
        where = f":{text.count(chr(10), 0, exc.position) + 1}" if lines else ""
        raise ConfigError(f"{source}{where}: not valid YAML (the character U+{exc.character:04X} is not allowed "
                          "in YAML)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: str | Path):
    """:func:`load_yaml` of a UTF-8 file; FileNotFoundError when it does not exist, ConfigError naming the file
    (and the line) when it is a folder, cannot be read, is over MAX_FILE_BYTES or is not UTF-8."""
    with named_open_errors(path, ConfigError, "a YAML file"), open(path, "rb") as fh:
        data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: over {MAX_FILE_BYTES >> 20} MiB, not a config (a config is a few KB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte "
                          f"0x{data[exc.start]:02x} at byte offset {exc.start}); save the file as UTF-8") from None
    return load_yaml(text, str(path))


def parse_overrides(overrides) -> list[tuple[str, object]]:
    """``["train.kappa=0.3", ...]`` -> ``[("train.kappa", 0.3), ...]`` with YAML-typed values (an empty value is
    null); ConfigError naming the override when it has no ``=``, an empty or blank part in its key, or a value
    that is not valid YAML."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        shown = repr(item) if len(item) <= 200 else repr(item[:160]) + f"... ({len(item):,} characters)"
        if not sep or not key:
            raise ConfigError(f"override {shown} is not of the form section.key=value")
        if not all(part and part.strip() == part for part in key.split(".")):
            raise ConfigError(f"override {shown}: the key {key!r} has an empty or blank part; write "
                              "section.key=value")
        out.append((key, load_yaml(raw, f"override {shown}", lines=False) if raw.strip() else None))
    return out


def set_dotted(tree: dict, dotted: str, value) -> None:
    """``tree[a][b][c] = value`` for ``dotted`` ``a.b.c``, making the sections on the way."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
    node[parts[-1]] = value


def dotted_leaves(value, prefix: str, depth: int = 0) -> list[str]:
    """The dotted keys under ``prefix`` in ``value`` (``decode.nope.lam`` for ``{"lam": 1}``), the first 10."""
    if not isinstance(value, dict) or not value or depth > 8:
        return [prefix]
    return [leaf for k, v in list(value.items())[:10] for leaf in dotted_leaves(v, f"{prefix}.{k}", depth + 1)][:10]
