"""Turn common configuration mistakes into messages that name the fix."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from mmengine.registry import Registry

_UNKNOWN_TYPE = re.compile(
    r"(?P<type>[^\s'\"]+) is not in the (?P<scope>[\w.]+)::(?P<name>[\w ]+) registry"
)


def _lineage(registry: Registry) -> Iterator[Registry]:
    """The registry, its ancestors, and every registry below the root (siblings' names help)."""
    node: Registry | None = registry
    root = registry
    while node is not None:
        yield node
        root = node
        node = node.parent
    stack = list(root.children.values())
    while stack:
        child = stack.pop()
        yield child
        stack.extend(child.children.values())


def _find_registry(scope: str, name: str) -> Registry | None:
    from effvision import registry as ours

    for candidate in vars(ours).values():
        if isinstance(candidate, Registry) and candidate.name == name:
            for node in _lineage(candidate):
                if node.scope == scope:
                    return node
            return candidate
    return None


def close_type_names(type_name: str, registry: Registry, n: int = 5) -> list[str]:
    """Registered names that look like ``type_name``, searched across the registry tree.

    Names from another scope than ``registry``'s come with their scope prefix (``mmdet.Foo``).
    """
    candidates: dict[str, str] = {}
    for node in _lineage(registry):
        node.import_from_location()
        for key in node.module_dict:
            shown = (
                key
                if node.scope in (registry.scope, 'mmseg', 'mmengine')
                else f'{node.scope}.{key}'
            )
            candidates.setdefault(key.lower(), shown)
    bare = type_name.split('.')[-1].lower()
    matches = difflib.get_close_matches(bare, list(candidates), n=n, cutoff=0.6)
    return [candidates[m] for m in matches]


def explain_unknown_type(error: BaseException) -> str | None:
    """If ``error`` is mmengine's "X is not in the S::N registry", a message with close matches.

    Returns None for any other error, so callers can re-raise it unchanged.
    """
    match = _UNKNOWN_TYPE.search(str(error))
    if match is None:
        return None
    type_name, scope, name = match['type'], match['scope'], match['name']
    registry = _find_registry(scope, name)
    hint = ''
    if registry is not None:
        close = close_type_names(type_name, registry)
        if close:
            hint = f' Did you mean: {", ".join(close)}?'
    return (
        f'unknown type {type_name!r}: it is not registered in the {scope}::{name} registry '
        f'(nor its parents).{hint} Check the spelling in the config; modules of mmdet need the '
        f'prefix "mmdet." and a config of another package `custom_imports`.'
    )
