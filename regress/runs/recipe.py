"""Recipes: what ``cli.py run`` fits, as a small declarative TOML file, validated before any work.

A recipe names its **members** (each one run: backbones, head and parameters, the tile size as a multiple
of the table's tile, context and slide centring), in the order of their value (the first is the most
valuable: ``--budget`` keeps members from the top), and the **stack** that blends them.  Every choice a
member leaves open (ridge alphas, ranks, kernel widths, the stack's weights) is made by inner CV on the
user's training data when the recipe runs; the recipe itself only says what to try.  ``quick``, ``default``
and ``best`` ship with hexpress (``regress/runs/recipes/``); a user's file has the same form::

    name = "mine"
    description = "two heads at two tile sizes"

    [cv]
    groups = "slide"          # grouping column (default: the table's patient/slide/... column)
    folds = "groups"          # leave-one-group-out, or a number of folds

    [stack]
    method = "cross-gene"     # nnls, select, shrink, ridge or cross-gene (members fitted --nested)
    center_folds = false

    [[member]]
    name = "ridge-1x"
    backbones = ["efficientnet_lite0"]
    head = "ridge"
    params = { alpha_per_target = false }
    scale = 1                 # 2: the same spots cut at twice their tile's side
    context = 6
    center_slides = true

A mistake (an unknown key, backbone, head or head parameter, a scale out of range) is one error naming the
key and the choices, before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UsageError

#: The recipes that ship with hexpress (files in ``regress/runs/recipes/``).
BUILTIN = ("quick", "default", "best")

_TOP = {"name", "description", "cv", "stack", "member", "embed"}
_CV = {"groups", "folds"}
_STACK = {"method", "center_folds", "alpha"}
_EMBED = {"tta"}
_MEMBER = {"name", "backbones", "head", "params", "scale", "context", "center_slides", "cross_gene"}


@dataclass(frozen=True)
class Member:
    """One run of a recipe."""

    name: str
    backbones: tuple[str, ...]
    head: str = "ridge"
    params: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0
    context: int = 0
    center_slides: bool = False
    cross_gene: bool = False


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (see the module docstring)."""

    name: str
    members: tuple[Member, ...]
    description: str = ""
    groups: str | None = None
    folds: int | str = "groups"
    stack_method: str = "cross-gene"
    center_folds: bool = False
    stack_alpha: float = 1.0
    tta: int = 1
    source: str = ""

    @property
    def nested(self) -> bool:
        """Members are fitted ``--nested`` when the stack learns from inner predictions."""
        return self.stack_method == "cross-gene"

    @property
    def scales(self) -> list[float]:
        return sorted({m.scale for m in self.members})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["members"] = [asdict(m) for m in self.members]
        return d

    def digest(self) -> str:
        doc = self.to_dict()
        doc.pop("source", None)
        doc.pop("description", None)
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def keep(self, names: set[str]) -> "Recipe":
        """The same recipe with only the members named."""
        from dataclasses import replace

        return replace(self, members=tuple(m for m in self.members if m.name in names))


def builtin_path(name: str) -> Path:
    return Path(__file__).with_name("recipes") / f"{name}.toml"


def load_recipe(spec: str | os.PathLike) -> Recipe:
    """A shipped recipe by name (``quick``, ``default``, ``best``) or a TOML file, validated."""
    import tomllib

    spec = str(spec)
    path = builtin_path(spec) if spec in BUILTIN else Path(spec)
    if spec not in BUILTIN and not path.suffix == ".toml":
        raise UsageError(f"--recipe {spec}: give one of {', '.join(BUILTIN)} or a recipe file (*.toml).")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"--recipe {spec}: no such file.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--recipe {spec}: cannot be read ({exc}).") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--recipe {spec}: not valid TOML ({exc}).") from exc
    return parse_recipe(doc, source=spec)


def _unknown(where: str, keys, allowed: set[str], src: str) -> None:
    bad = sorted(set(keys) - allowed)
    if bad:
        raise UsageError(f"recipe {src}: unknown key '{bad[0]}' in {where}; the keys are: {', '.join(sorted(allowed))}.")


def _typed(v, kind, what: str, src: str):
    if kind is bool:
        ok = isinstance(v, bool)
    elif kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    else:
        ok = isinstance(v, kind)
    if not ok:
        raise UsageError(f"recipe {src}: {what} = {v!r} must be {getattr(kind, '__name__', kind)}.")
    return v


def parse_recipe(doc: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a recipe document (parsed TOML) into a :class:`Recipe`; one :class:`UsageError` per mistake."""
    from featurize.models.backbones import get_spec
    from featurize.tables.rescale import MULTIPLE_RANGE
    from regress.heads.registry import list_heads, make_head
    from regress.runs.stack_methods import METHODS
    from core.errors import HexpressError

    src = source
    _unknown("the recipe", doc, _TOP, src)
    cv, stack, emb = doc.get("cv", {}), doc.get("stack", {}), doc.get("embed", {})
    for where, part, allowed in (("[cv]", cv, _CV), ("[stack]", stack, _STACK), ("[embed]", emb, _EMBED)):
        _typed(part, dict, where, src)
        _unknown(where, part, allowed, src)
    method = stack.get("method", "cross-gene")
    if method not in METHODS:
        raise UsageError(f"recipe {src}: [stack] method = {method!r}; choose {', '.join(METHODS)}.")
    folds = cv.get("folds", "groups")
    if not (folds == "groups" or (isinstance(folds, int) and not isinstance(folds, bool) and folds >= 2)):
        raise UsageError(f"recipe {src}: [cv] folds = {folds!r}; give \"groups\" (leave-one-group-out) or a "
                         "number of folds >= 2.")
    groups = cv.get("groups")
    if groups is not None:
        _typed(groups, str, "[cv] groups", src)
    tta = _typed(emb.get("tta", 1), int, "[embed] tta", src)
    if tta not in (1, 2, 4, 8):
        raise UsageError(f"recipe {src}: [embed] tta = {tta}; choose 1, 2, 4 or 8.")
    raw = doc.get("member")
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"recipe {src}: no [[member]]; a recipe names at least one run to fit.")
    members, names = [], set()
    heads = list_heads()
    for i, m in enumerate(raw):
        where = f"[[member]] {i + 1}"
        _typed(m, dict, where, src)
        _unknown(where, m, _MEMBER, src)
        name = _typed(m.get("name", f"m{i + 1}"), str, f"{where} name", src)
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name in names:
            raise UsageError(f"recipe {src}: {where} name = {name!r}: give each member its own name of letters, "
                             "digits, '-', '_' or '.'.")
        names.add(name)
        where = f"member '{name}'"
        bbs = m.get("backbones")
        if isinstance(bbs, str):
            bbs = [bbs]
        if not isinstance(bbs, list) or not bbs or not all(isinstance(b, str) for b in bbs):
            raise UsageError(f"recipe {src}: {where} backbones must be a list of backbone names.")
        for b in bbs:
            try:
                get_spec(b)
            except HexpressError as exc:
                raise UsageError(f"recipe {src}: {where} backbone {b!r}: {exc}") from exc
        head = _typed(m.get("head", "ridge"), str, f"{where} head", src)
        if head not in heads:
            raise UsageError(f"recipe {src}: {where} head = {head!r}; choose {', '.join(heads)}.")
        params = _typed(m.get("params", {}), dict, f"{where} params", src)
        try:
            make_head(head, "cpu", 0, params)
        except HexpressError as exc:
            raise UsageError(f"recipe {src}: {where} params: {str(exc).replace('--head-param ', '')}") from exc
        scale = float(_typed(m.get("scale", 1), float, f"{where} scale", src))
        if not MULTIPLE_RANGE[0] <= scale <= MULTIPLE_RANGE[1]:
            raise UsageError(f"recipe {src}: {where} scale = {scale:g}; give a multiple of the table's tile side "
                             f"from {MULTIPLE_RANGE[0]:g} to {MULTIPLE_RANGE[1]:g}.")
        context = _typed(m.get("context", 0), int, f"{where} context", src)
        if context < 0:
            raise UsageError(f"recipe {src}: {where} context = {context}; give 0 (none) or more neighbours.")
        cg = _typed(m.get("cross_gene", False), bool, f"{where} cross_gene", src)
        if cg and method == "cross-gene":
            raise UsageError(f"recipe {src}: {where} cross_gene = true, but [stack] method = \"cross-gene\" applies "
                             "the cross-gene map itself to members fitted --nested; drop it.")
        members.append(Member(name, tuple(bbs), head, dict(params), scale, context,
                              _typed(m.get("center_slides", False), bool, f"{where} center_slides", src), cg))
    alpha = float(_typed(stack.get("alpha", 1.0), float, "[stack] alpha", src))
    return Recipe(name=_typed(doc.get("name", Path(src).stem), str, "name", src), members=tuple(members),
                  description=_typed(doc.get("description", ""), str, "description", src), groups=groups,
                  folds=folds, stack_method=method,
                  center_folds=_typed(stack.get("center_folds", False), bool, "[stack] center_folds", src),
                  stack_alpha=alpha, tta=tta, source=src)
