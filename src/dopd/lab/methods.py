"""The methods of a lab run: a method name with objective overrides in brackets (`dopd[self_weights=ema]`,
`dopd[regimes=LH+HT]`), each checked before any work, and the two references every run includes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import LabConfig

REFERENCES = ("sft", "opd")  # the runs that show the budget moves the student


# ----------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodSpec:
    """A method of `--methods` with objective overrides: `dopd[self_weights=frozen]`, `dopd[regimes=LH+HT]`."""

    label: str
    method: str
    overrides: tuple[tuple[str, object], ...] = ()


def parse_method(text: str) -> MethodSpec:
    """`name` or `name[key=value,key=value]`: every `objective.*` key, values in YAML, `+` joining list items.
    Raises ValueError with one line when the method, a key or a value cannot work."""
    import yaml

    from ..objectives import METHODS, ObjectiveConfig, build_objective

    label = text.strip()
    name, bracket, rest = label.partition("[")
    if bracket and not rest.endswith("]"):
        raise ValueError(f"--methods {label!r}: overrides go in brackets, e.g. dopd[self_weights=frozen]")
    if name not in METHODS:
        raise ValueError(f"--methods has {name!r}; known: {', '.join(METHODS)}")
    overrides: dict[str, object] = {}
    for item in filter(None, rest[:-1].split(",")) if bracket else ():
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("objective.")
        if not sep or key not in ObjectiveConfig.__dataclass_fields__:
            raise ValueError(
                f"--methods {label!r}: {item!r} is not KEY=VALUE with KEY an objective key "
                f"(e.g. self_weights, regimes, beta_w)"
            )
        if key == "method":
            raise ValueError(f"--methods {label!r}: the method is the name before the brackets")
        parsed = [yaml.safe_load(v) for v in value.split("+")] if "+" in value else yaml.safe_load(value)
        if isinstance(getattr(ObjectiveConfig(), key), list) and not isinstance(parsed, list):
            parsed = [parsed]
        overrides[key] = parsed
    try:
        build_objective({"method": name, **overrides})
    except (TypeError, ValueError) as error:
        raise ValueError(f"--methods {label!r}: {error}") from None
    return MethodSpec(label, name, tuple(sorted(overrides.items())))


def split_methods(text: str) -> list[str]:
    """`--methods` as a list: comma-separated methods, where a method's brackets may hold commas
    (`opd,dopd[beta_w=0.2,beta_l=0.5]`)."""
    methods, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            methods.append(current)
            current = ""
        else:
            current += char
    methods.append(current)
    return [m.strip() for m in methods if m.strip()]


def method_specs(config: LabConfig) -> list[MethodSpec]:
    """The methods to run: the two references first (added when missing), then the others, each once."""
    specs, seen = [], set()
    for text in [*REFERENCES, *config.methods]:
        spec = parse_method(text)
        if spec.label not in seen:
            seen.add(spec.label)
            specs.append(spec)
    return specs
