"""Reading an audit config: YAML → a validated :class:`~reprocheck.config.Config`, with
every error naming file:line and key.

Parsing is safe: a YAML tag that would construct a Python object is an error, never
executed; duplicate keys and alias bombs are refused. Every scalar goes through one
validator (:func:`_value`), which takes the field's type, default and range from the
dataclass; a misspelt key gets a did-you-mean, an optimizer keyword is checked against
the ``torch.optim`` class's signature — all before any run starts.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import yaml

from .config import (
    LOSSES,
    PHASES,
    PRESETS,
    Config,
    ConfigError,
    DataConfig,
    DeterminismConfig,
    DistributedConfig,
    FactoryConfig,
    OptimizerConfig,
    ToleranceConfig,
)
from .contract import PYTHON_ENV
from .usercode import _IDENT, split_factory

MAX_YAML_NODES = 100_000  # past this an alias bomb is refused, not expanded


# ------------------------------------------------------------------------- YAML loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and unknown tags, and counts nodes."""


def _unknown_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"tag {node.tag!r} is not allowed (plain YAML only)", node.start_mark
    )


_Loader.add_multi_constructor("!", _unknown_tag)
_Loader.add_multi_constructor("tag:", _unknown_tag)


class _Located:
    """Line numbers of keys and values: key path (tuple) → 1-based line."""

    def __init__(self) -> None:
        self.lines: dict[tuple, int] = {}


def _walk(node: yaml.Node, path: tuple, located: _Located, budget: list[int]) -> None:
    budget[0] += 1
    if budget[0] > MAX_YAML_NODES:
        raise ConfigError(
            f"line {node.start_mark.line + 1}: more than {MAX_YAML_NODES:,} YAML "
            "nodes (an alias bomb?) — write the config out plainly"
        )
    located.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"line {line}: {'.'.join(map(str, path + (key,)))}: duplicate key "
                    f"{key!r} (first at line {seen[key]}) — keep one"
                )
            seen[key] = line
            located.lines[path + (key,)] = line
            _walk(value_node, path + (key,), located, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), located, budget)


def _parse_yaml(text: str, where: str) -> tuple[Any, _Located]:
    located = _Located()
    if "\t" in text:
        for number, line in enumerate(text.splitlines(), 1):
            if "\t" in line[: len(line) - len(line.lstrip())]:
                raise ConfigError(
                    f"{where}:{number}: tab used for indentation — indent with spaces"
                )
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, located
            try:
                _walk(node, (), located, [0])
            except ConfigError as exc:
                raise ConfigError(
                    f"{where}:{str(exc)[5:]}" if str(exc).startswith("line ") else f"{where}: {exc}"
                ) from None
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        if isinstance(exc, yaml.constructor.ConstructorError):
            raise ConfigError(f"{where}{line}: {problem}") from None
        raise ConfigError(f"{where}{line}: YAML syntax error: {problem} — fix the YAML") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: YAML error: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    return data, located


def _is_python_script(path: str) -> bool:
    """A ``.py`` file, or one whose first line is a ``#!`` naming python: never a config."""
    if path.lower().endswith((".py", ".pyw")):
        return True
    try:
        with open(path, "rb") as handle:
            first = handle.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a config file."""
    where = os.fspath(path)
    if not os.path.exists(where):
        raise ConfigError(f"{where}: no such config file")
    if os.path.isdir(where):
        raise ConfigError(f"{where}: is a folder — give the YAML config file")
    if _is_python_script(where):
        raise ConfigError(
            f"{where} is a Python script, not a config: audit it with "
            f"`reprocheck exec -- python {shlex.quote(where)}`"
        )
    try:
        with open(where, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    if b"\x00" in raw:
        raise ConfigError(f"{where}: binary file, not a YAML config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text, not a YAML config") from None
    data, located = _parse_yaml(text, where)
    if data is None:
        raise ConfigError(f"{where}: empty config — start from configs/demo.yaml")
    base_dir = os.path.dirname(os.path.abspath(where))
    config = _build(data, _Context(where, located, base_dir))
    return dataclasses.replace(
        config, path=where, base_dir=base_dir, sha256=hashlib.sha256(raw).hexdigest()
    )


# ------------------------------------------------------------------------- validation


class _Context:
    def __init__(self, where: str | None, located: _Located | None, base_dir: str) -> None:
        self.where = where
        self.located = located or _Located()
        self.base_dir = base_dir

    def error(self, path: tuple, message: str) -> ConfigError:
        line = None
        probe = path
        while probe and line is None:
            line = self.located.lines.get(probe)
            probe = probe[:-1]
        place = self.where or "config"
        if line is not None:
            place += f":{line}"
        key = ".".join(str(p) for p in path)
        return ConfigError(f"{place}: {key}: {message}" if key else f"{place}: {message}")


def _suggest(word: str, choices: Any) -> str:
    """`` — did you mean 'AdamW'?`` for the closest choice (case counts least), or ''."""
    options = [str(c) for c in choices]
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" — did you mean {by_lower[close[0]]!r}?" if close else ""


def _mapping(ctx: _Context, path: tuple, value: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        what = (
            "a mapping (key: value lines)"
            if path
            else "a mapping of keys (name:, model:, data:, ...)"
        )
        raise ctx.error(path, f"expected {what}, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            raise ctx.error(
                path + (key,),
                f"unknown key {key!r}{_suggest(key, allowed)}"
                + ("" if _suggest(key, allowed) else f" (allowed: {', '.join(allowed)})"),
            )
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _int(ctx: _Context, path: tuple, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(path, f"expected an integer, got {_kind(value)} {value!r}")
    if not low <= value <= high:
        raise ctx.error(path, f"{value} is out of range {low}..{high}")
    return value


def _float(ctx: _Context, path: tuple, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.error(path, f"expected a number, got {_kind(value)} {value!r}")
    if value != value or value in (float("inf"), float("-inf")) or value < low:
        raise ctx.error(path, f"{value} must be a finite number ≥ {low:g}")
    return float(value)


def _bool(ctx: _Context, path: tuple, value: Any, nullable: bool = False) -> bool | None:
    if value is None and nullable:
        return None
    if not isinstance(value, bool):
        raise ctx.error(
            path,
            f"expected true or false{' or null' if nullable else ''}, got {_kind(value)} {value!r}",
        )
    return value


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _default(cls: type, name: str) -> Any:
    """A config field's default, from the dataclass: the one place it is written."""
    found = _field(cls, name)
    if found.default is not dataclasses.MISSING:
        return found.default
    return found.default_factory()  # type: ignore[misc]


def _range(cls: type, name: str) -> tuple[Any, Any]:
    return _field(cls, name).metadata["range"]


def _value(ctx: _Context, path: tuple, cls: type, name: str, data: Mapping[str, Any]) -> Any:
    """The one validator of a scalar field: ``data[name]`` (else the field's default)
    checked against the field's type (``int``, ``float``, ``bool``, ``… | None``) and
    range, both from the dataclass."""
    found = _field(cls, name)
    value = data.get(name, _default(cls, name))
    where = path + (name,)
    kind = str(found.type)
    if value is None and kind.endswith("| None"):
        return None
    base = kind.split(" |")[0]
    if base == "int":
        return _int(ctx, where, value, *found.metadata["range"])
    if base == "float":
        return _float(ctx, where, value, found.metadata["range"][0])
    if base == "bool":
        return _bool(ctx, where, value, nullable=kind.endswith("| None"))
    raise TypeError(f"no validator for {cls.__name__}.{name} of type {kind}")


def _str(ctx: _Context, path: tuple, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(path, f"expected a non-empty string, got {_kind(value)} {value!r}")
    return value.strip()


def _factory(ctx: _Context, path: tuple, value: Any) -> str:
    spec = _str(ctx, path, value)
    try:
        target, function = split_factory(spec)
    except ValueError as exc:
        raise ctx.error(
            path, f"{exc} — e.g. reprocheck.zoo.models:mlp or models.py:build"
        ) from None
    if target.endswith(".py"):
        file = target if os.path.isabs(target) else os.path.join(ctx.base_dir, target)
        if not os.path.isfile(file):
            raise ctx.error(path, f"file {target} not found (relative to {ctx.base_dir})")
        try:
            with open(file, encoding="utf-8") as handle:
                tree = ast.parse(handle.read(), filename=file)
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise ctx.error(path, f"{target} does not parse: {exc}") from None
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
        if function not in names:
            raise ctx.error(path, f"{target} defines no {function!r}{_suggest(function, names)}")
    return spec


def _kwargs(ctx: _Context, path: tuple, value: Any) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ctx.error(path, f"expected a mapping of keyword arguments, got {_kind(value)}")
    return MappingProxyType(dict(value))


def _determinism(ctx: _Context, value: Any) -> DeterminismConfig:
    path = ("determinism",)
    if value is None:
        return DeterminismConfig()
    if isinstance(value, str):
        value = {"preset": value}
    names = tuple(f.name for f in dataclasses.fields(DeterminismConfig))
    data = _mapping(ctx, path, value, names)
    preset = data.get("preset", "seeded")
    if preset not in PRESETS:
        raise ctx.error(
            path + ("preset",),
            f"unknown preset {preset!r}{_suggest(preset, PRESETS)} (choose {', '.join(PRESETS)})",
        )
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    for key in (
        "seed_python",
        "seed_numpy",
        "seed_torch",
        "dataloader_generator",
        "cudnn_benchmark",
        "cudnn_deterministic",
        "fill_uninitialized_memory",
        "pythonhashseed",
    ):
        if key in data:
            values[key] = _value(ctx, path, DeterminismConfig, key, data)
    if "deterministic_algorithms" in data:
        det = data["deterministic_algorithms"]
        if det != "warn" and not isinstance(det, bool):
            raise ctx.error(
                path + ("deterministic_algorithms",), f"expected true, false or warn, got {det!r}"
            )
        values["deterministic_algorithms"] = det
    if "cublas_workspace" in data:
        cublas = data["cublas_workspace"]
        if cublas is not None and (
            not isinstance(cublas, str) or not re.fullmatch(r":\d+:\d+", cublas)
        ):
            raise ctx.error(
                path + ("cublas_workspace",),
                f"expected ':4096:8' or ':16:8' (or null), got {cublas!r}",
            )
        values["cublas_workspace"] = cublas
    return DeterminismConfig(**values)


def _optimizer_keywords(cls: type) -> set[str] | None:
    """The keyword arguments an optimizer class takes besides its parameters; None where
    its signature cannot be read or takes ``**kwargs``."""
    import inspect

    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())[2:]  # self, params
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _static_optimizer_keywords(name: str) -> set[str] | None:
    """The keywords ``torch.optim.<name>`` takes besides its parameters, read from the
    installed torch's source without importing it (an import costs ~1 s, and a config is
    validated before its runs start): the class ``torch/optim/__init__.py`` imports under
    that name, derived from ``Optimizer``, and its ``__init__``'s (or its optimizer base's)
    keywords after ``self, params``. None where that cannot be read from the source (no
    such class, ``**kwargs``, no ``__init__`` of its own): the caller then checks against
    the imported class. Only an acceptance is taken from here, so a misread source never
    refuses a valid config."""
    from .determinism import torch_source

    root = torch_source("optim")
    if root is None:
        return None

    def parse(module: str) -> ast.Module:
        with open(os.path.join(root, module), encoding="utf-8") as handle:
            return ast.parse(handle.read())

    def read(cls_name: str, where: dict[str, str], depth: int) -> set[str] | None:
        module = where.get(cls_name)
        if module is None or depth > 8:
            return None
        cls = next(
            (c for c in parse(module).body if isinstance(c, ast.ClassDef) and c.name == cls_name),
            None,
        )
        if cls is None:
            return None
        bases = [getattr(b, "id", None) or getattr(b, "attr", "") for b in cls.bases]
        inits = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"]
        init = inits[-1] if inits else None  # the last definition is the class's
        if "Optimizer" not in bases:  # an optimizer's subclass (AdamW of Adam), or none
            parents = [b for b in bases if b in where]
            if len(parents) != 1 or read(parents[0], where, depth + 1) is None:
                return None
            if init is None:
                return read(parents[0], where, depth + 1)
        if init is None or init.args.kwarg is not None or init.decorator_list:
            return None  # **kwargs, or a decorator that may change the signature
        args = init.args  # keywords: after self, params (positional-only ones are none)
        return {a.arg for a in [*args.posonlyargs, *args.args][2:] if a in args.args} | {
            a.arg for a in args.kwonlyargs
        }

    try:
        where = {}  # exported name → its module's file
        for node in parse("__init__.py").body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.optim."):
                module = node.module.removeprefix("torch.optim.")  # type: ignore[union-attr]
                if "." not in module and os.path.exists(os.path.join(root, module + ".py")):
                    where.update(
                        {a.name: module + ".py" for a in node.names if a.asname in (None, a.name)}
                    )
        return read(name, where, 0) if name != "Optimizer" else None
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _optimizer(ctx: _Context, value: Any) -> OptimizerConfig:
    path = ("optimizer",)
    if value is None:
        return OptimizerConfig()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ctx.error(path, f"expected a mapping like {{name: SGD, lr: 0.1}}, got {_kind(value)}")
    name = _str(ctx, path + ("name",), value.get("name", "SGD"))
    kwargs = {k: v for k, v in value.items() if k != "name"}
    known = _static_optimizer_keywords(name)
    if known is not None and all(isinstance(k, str) and k in known for k in kwargs):
        if "lr" in kwargs:  # accepted from the source: torch is not imported here
            _float(ctx, path + ("lr",), kwargs["lr"])
        return OptimizerConfig(name=name, kwargs=MappingProxyType(kwargs))
    import torch

    classes = [
        n
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        and n != "Optimizer"
    ]
    if name not in classes:
        raise ctx.error(
            path + ("name",),
            f"unknown optimizer {name!r}{_suggest(name, classes)} (a class in torch.optim)",
        )
    accepted = _optimizer_keywords(getattr(torch.optim, name))
    for key in kwargs:
        if not isinstance(key, str) or not re.fullmatch(_IDENT, key):
            raise ctx.error(path + (key,), f"{key!r} is not a keyword argument name")
        if accepted is not None and key not in accepted:  # caught here, before any run
            raise ctx.error(
                path + (key,),
                f"torch.optim.{name} takes no argument {key!r}{_suggest(key, accepted)} "
                f"(it takes {', '.join(sorted(accepted))})",
            )
    if "lr" in kwargs:
        _float(ctx, path + ("lr",), kwargs["lr"])
    return OptimizerConfig(name=name, kwargs=MappingProxyType(kwargs))


def _loss(ctx: _Context, value: Any) -> str:
    loss = _str(ctx, ("loss",), value)
    if ":" in loss:
        return _factory(ctx, ("loss",), loss)
    if loss not in LOSSES:
        raise ctx.error(
            ("loss",),
            f"unknown loss {loss!r}{_suggest(loss, LOSSES)} "
            "(a torch.nn.functional loss or module:function)",
        )
    return loss


def _devices(ctx: _Context, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ctx.error(("devices",), f"expected a device or a list of devices, got {_kind(value)}")
    devices = []
    for index, item in enumerate(items):
        if not isinstance(item, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", item):
            raise ctx.error(
                ("devices", index),
                f"unknown device {item!r}"
                f"{_suggest(item, ('cpu', 'cuda', 'mps'))} (cpu, cuda, cuda:N or mps)",
            )
        if item in devices:
            raise ctx.error(("devices", index), f"device {item!r} listed twice")
        devices.append(item)
    return tuple(devices)


def _threads(ctx: _Context, value: Any) -> tuple[int | None, ...]:
    if value is None:
        return (None,)
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not items:
        raise ctx.error(
            ("threads",), f"expected a thread count or a list of them, got {_kind(value)}"
        )
    out = tuple(_int(ctx, ("threads", i), item, 1, 1024) for i, item in enumerate(items))
    if len(set(out)) != len(out):
        raise ctx.error(("threads",), "a thread count is listed twice")
    return out


def _compile(ctx: _Context, value: Any) -> tuple[bool | None, ...]:
    if value is None:
        return (None,)
    items = [value] if isinstance(value, bool) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, bool) for v in items):
        raise ctx.error(("compile",), f"expected true, false or [false, true], got {value!r}")
    if len(set(items)) != len(items):
        raise ctx.error(("compile",), "a compile setting is listed twice")
    return tuple(items)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _environment(ctx: _Context, path: tuple, value: Any) -> tuple[tuple[str, str], ...]:
    """One leg's environment: variable names to values (numbers become their text)."""
    if not isinstance(value, dict):
        raise ctx.error(path, f"expected a mapping of variables to values, got {_kind(value)}")
    out = []
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ctx.error(path, f"{key!r} is not an environment variable name")
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ctx.error((*path, key), f"expected a string or number, got {_kind(item)}")
        out.append((key, str(item)))
    return tuple(sorted(out))


def _environments(ctx: _Context, value: Any) -> tuple[tuple[tuple[str, str], ...], ...]:
    if value is None:
        return ((),)
    if not isinstance(value, list) or not value:
        raise ctx.error(
            ("environments",), f"expected a list of mappings ({{}} first), got {_kind(value)}"
        )
    out = tuple(_environment(ctx, ("environments", i), item) for i, item in enumerate(value))
    if len(set(out)) != len(out):
        raise ctx.error(("environments",), "an environment is listed twice")
    return out


def _record(ctx: _Context, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.error(
            ("record",), f"expected a list of phases ({', '.join(PHASES)}), got {_kind(value)}"
        )
    for index, phase in enumerate(value):
        if phase not in PHASES:
            raise ctx.error(
                ("record", index),
                f"unknown phase {phase!r}{_suggest(phase, PHASES)} "
                f"(choose from {', '.join(PHASES)})",
            )
    return tuple(p for p in PHASES if p in value)


def _model(ctx: _Context, value: Any) -> FactoryConfig:
    if isinstance(value, str):
        value = {"factory": value}
    data = _mapping(ctx, ("model",), value, ("factory", "kwargs"))
    if "factory" not in data:
        raise ctx.error(
            ("model",), "missing key 'factory' — e.g. factory: reprocheck.zoo.models:mlp"
        )
    return FactoryConfig(
        _factory(ctx, ("model", "factory"), data["factory"]),
        _kwargs(ctx, ("model", "kwargs"), data.get("kwargs")),
    )


def _data(ctx: _Context, value: Any) -> DataConfig:
    if isinstance(value, str):
        value = {"factory": value}
    names = tuple(f.name for f in dataclasses.fields(DataConfig))
    data = _mapping(ctx, ("data",), value, names)
    if "factory" not in data:
        raise ctx.error(
            ("data",), "missing key 'factory' — e.g. factory: reprocheck.zoo.data:classification"
        )
    p = ("data",)
    return DataConfig(
        factory=_factory(ctx, p + ("factory",), data["factory"]),
        kwargs=_kwargs(ctx, p + ("kwargs",), data.get("kwargs")),
        batch_size=_value(ctx, p, DataConfig, "batch_size", data),
        shuffle=_value(ctx, p, DataConfig, "shuffle", data),
        num_workers=_value(ctx, p, DataConfig, "num_workers", data),
        drop_last=_value(ctx, p, DataConfig, "drop_last", data),
    )


def _distributed(ctx: _Context, value: Any) -> DistributedConfig | None:
    if value is None:
        return None
    data = _mapping(ctx, ("distributed",), value, ("nproc_per_node", "backend"))
    backend = data.get("backend", "gloo")
    if backend not in ("gloo", "nccl"):
        raise ctx.error(("distributed", "backend"), f"expected gloo or nccl, got {backend!r}")
    return DistributedConfig(
        nproc_per_node=_value(ctx, ("distributed",), DistributedConfig, "nproc_per_node", data),
        backend=backend,
    )


def _tolerance(ctx: _Context, value: Any) -> ToleranceConfig:
    if value is None:
        return ToleranceConfig()
    data = _mapping(ctx, ("tolerance",), value, ("across_legs",))
    legs = _mapping(
        ctx, ("tolerance", "across_legs"), data.get("across_legs") or {}, ("rtol", "atol")
    )
    p = ("tolerance", "across_legs")
    return ToleranceConfig(
        rtol=_value(ctx, p, ToleranceConfig, "rtol", legs),
        atol=_value(ctx, p, ToleranceConfig, "atol", legs),
    )


_TOP_KEYS = tuple(f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal"))


def _build(data: Any, ctx: _Context) -> Config:
    top = _mapping(ctx, (), data, _TOP_KEYS)
    for key in ("name", "model", "data"):
        if key not in top:
            raise ctx.error((), f"missing required key {key!r} — see configs/demo.yaml")
    name = top["name"]
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        name = str(name)
    return Config(
        name=_str(ctx, ("name",), name),
        seed=_value(ctx, (), Config, "seed", top),
        repeats=_value(ctx, (), Config, "repeats", top),
        steps=_value(ctx, (), Config, "steps", top),
        devices=_devices(ctx, top.get("devices", list(_default(Config, "devices")))),
        threads=_threads(ctx, top.get("threads")),
        compile=_compile(ctx, top.get("compile")),
        environments=_environments(ctx, top.get("environments")),
        determinism=_determinism(ctx, top.get("determinism")),
        model=_model(ctx, top["model"]),
        data=_data(ctx, top["data"]),
        optimizer=_optimizer(ctx, top.get("optimizer")),
        loss=_loss(ctx, top.get("loss", _default(Config, "loss"))),
        step=None if top.get("step") is None else _factory(ctx, ("step",), top["step"]),
        record=_record(ctx, top.get("record", list(_default(Config, "record")))),
        tolerance=_tolerance(ctx, top.get("tolerance")),
        distributed=_distributed(ctx, top.get("distributed")),
        base_dir=ctx.base_dir,
    )


def config_from_dict(data: dict, *, path: str | None = None, base_dir: str = ".") -> Config:
    """Validate a config given as data (no line numbers to report)."""
    config = _build(data, _Context(path, None, base_dir))
    return dataclasses.replace(config, path=path, base_dir=base_dir)


def apply_overrides(
    config: Config,
    *,
    repeats: int | None = None,
    steps: int | None = None,
    devices: list[str] | None = None,
    threads: list[int] | None = None,
    env: list[str] | None = None,
    compile: list[str] | None = None,
    python: list[str] | None = None,
) -> Config:
    """The CLI's -n/--steps/--device/--threads/--env over the config, validated like the
    YAML. ``--env KEY=VALUE`` (repeatable) adds one leg in that environment beside the
    config's."""
    ctx = _Context("command line", None, config.base_dir)
    changes: dict[str, Any] = {}
    if repeats is not None:
        changes["repeats"] = _int(ctx, ("-n",), repeats, *_range(Config, "repeats"))
    if steps is not None:
        changes["steps"] = _int(ctx, ("--steps",), steps, *_range(Config, "steps"))
    if devices is not None:
        try:
            changes["devices"] = _devices(ctx, list(devices))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("devices", "--device", 1)) from None
    if threads is not None:
        try:
            changes["threads"] = _threads(ctx, list(threads))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("threads", "--threads", 1)) from None
    if compile:
        words = [w.strip().lower() for item in compile for w in item.split(",") if w.strip()]
        values = {"off": False, "on": True, "false": False, "true": True}
        bad = [w for w in words if w not in values]
        if bad or not words:
            raise ConfigError(f"--compile takes off, on or off,on (got {','.join(compile)!r})")
        chosen = tuple(dict.fromkeys(values[w] for w in words))
        changes["compile"] = chosen
    if env:
        pairs = {}
        for item in env:
            key, sep, value = item.partition("=")
            if not sep or not _ENV_NAME.match(key):
                raise ConfigError(f"--env takes KEY=VALUE (got {item!r})")
            pairs[key] = value
        extra = tuple(sorted(pairs.items()))
        if extra not in config.environments:
            changes["environments"] = (*config.environments, extra)
    for interpreter in python or []:
        path = shutil.which(interpreter) or interpreter
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ConfigError(f"--python {interpreter}: no such interpreter")
        leg = ((PYTHON_ENV, os.path.abspath(path)),)
        known = changes.get("environments", config.environments)
        if leg not in known:
            changes["environments"] = (*known, leg)
    return dataclasses.replace(config, **changes)
