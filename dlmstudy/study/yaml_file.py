"""Reading a YAML file as untrusted input: UTF-8 only, bounded in size and expansion, no duplicate keys.

`yaml.safe_load` builds no Python objects from tags, but it takes the last of two equal keys without a
word, and a file of nested aliases ("billion laughs": nine aliases of nine aliases of ...) composes in
microseconds into a graph whose expansion no later step (validation, JSON, hashing) survives. Here the
composed graph is measured first: its expanded size is counted once per distinct node, so the check
itself stays linear in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from dlmstudy.errors import UserError

MAX_BYTES = 1 << 20  # a study spec is a few kilobytes
MAX_VALUES = 100_000  # scalars, lists and mappings after every alias is expanded
MAX_DEPTH = 64  # lists and mappings inside each other
MERGE_TAG = "tag:yaml.org,2002:merge"


class TooDeep(ValueError):
    """Lists and mappings nested deeper than MAX_DEPTH (the composer would recurse once per level)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (merge keys `<<` may still be overridden) and
    values nested deeper than MAX_DEPTH."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise TooDeep(f"values nested more than {MAX_DEPTH} deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the constructor reports it
                continue
        return super().construct_mapping(node, deep=deep)


class SelfReference(ValueError):
    """An alias inside the value it names: its expansion never ends."""


def expanded_size(node: Node, limit: int = MAX_VALUES) -> int:
    """The number of values `node` stands for once every alias is expanded (stops counting past `limit`).

    Raises SelfReference for an alias that contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_nodes:
            raise SelfReference("an alias refers to a value that contains it")
        open_nodes.add(id(n))
        total = 1
        if isinstance(n, SequenceNode):
            children = n.value
        elif isinstance(n, MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_nodes.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def _where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f" line {mark.line + 1}:" if mark is not None else ""


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path`, or a one-line UserError naming the file (and line) of what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study spec not found: {path}")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES >> 20} MiB, not a study spec")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                        "save the file as UTF-8") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node) > MAX_VALUES:
            raise UserError(f"{path}: its aliases expand to more than {MAX_VALUES:,} values "
                            "(aliases of aliases, as in a 'billion laughs' file); refused")
        return loader.construct_document(node)
    except (SelfReference, TooDeep) as err:
        raise UserError(f"{path}: {err}; refused") from None
    except ValueError as err:  # e.g. a date that does not exist
        raise UserError(f"{path}: {err} (not a valid YAML value)") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}:{_where(err)} {problem} (not valid YAML)") from None
    finally:
        loader.dispose()
