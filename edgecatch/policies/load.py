"""Reading YAML documents into validated models, with errors that point at the line.

Every problem becomes a `ConfigProblem`: the file, the line, the path in the document
(`policies[2].sample`) and what is wrong. The same loader serves policy files and, later, any other
YAML configuration validated by a pydantic model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edgecatch.policies.schema import PolicyDocument

__all__ = ["ConfigError", "ConfigProblem", "load_model", "load_policy_file", "load_policy_text"]

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(ValueError):
    """A document that does not validate; `problems` lists each error with its location."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))

    @classmethod
    def from_message(cls, source: str, message: str) -> ConfigError:
        return cls([ConfigProblem(source, None, "", message)])


def format_path(loc: Loc) -> str:
    """('policies', 2, 'sample') -> 'policies[2].sample'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def load_policy_file(path: str | Path) -> PolicyDocument:
    return load_model(PolicyDocument, Path(path))


def load_policy_text(text: str, source: str = "<string>") -> PolicyDocument:
    return load_model_text(PolicyDocument, text, source)


def load_model(model: type[M], path: Path) -> M:
    return load_model_text(model, read_config_text(path), str(path))


def read_config_text(path: Path) -> str:
    """A config or policy file's text; a ConfigError naming the file when it cannot be read (missing,
    a folder, not UTF-8)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError.from_message(str(path), f"cannot read: {reason}") from None


def load_model_text(model: type[M], text: str, source: str) -> M:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise ConfigError([ConfigProblem(source, line, "", f"invalid YAML: {problem}")]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (a NUL, a control code)
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError([ConfigProblem(
            source, line, "", f"invalid YAML: {exc.reason} (#x{code:04x})")]) from None
    except yaml.YAMLError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the parser wrote
        raise ConfigError([ConfigProblem(source, None, "", f"invalid YAML: {message}")]) from None
    if root is None:
        raise ConfigError([ConfigProblem(source, 1, "", "the document is empty")])
    # Reported together with whatever else is wrong: every error in one go, as `validate` promises.
    duplicates = list(_duplicate_keys(root, (), source))
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(source, root.start_mark.line + 1, "", "the document must be a mapping")])
    # Checks of the raw document a model offers (`raw_errors`), so that they are reported even when
    # other parts fail: a validator of the whole list would only run once every item is valid.
    raw_errors = getattr(model, "raw_errors", None)
    early = [_problem(error, root, source, model) for error in raw_errors(data)] if raw_errors else []
    try:
        document = model.model_validate(data)
    except ValidationError as exc:
        problems = duplicates + early + [_problem(error, root, source, model) for error in exc.errors()]
        unique = {str(problem): problem for problem in problems}  # a raw check may repeat a validator's
        raise ConfigError(sorted(unique.values(), key=lambda p: p.line or 0)) from None
    if duplicates or early:
        raise ConfigError(sorted(duplicates + early, key=lambda p: p.line or 0))
    return document


def _duplicate_keys(node: yaml.Node, loc: Loc, source: str):
    """PyYAML keeps the last of two equal keys silently; a policy file must not."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                yield ConfigProblem(
                    source, key_node.start_mark.line + 1, format_path(loc),
                    f"duplicate key {key!r} (first on line {seen[key]})")
            else:
                seen[key] = key_node.start_mark.line + 1
            yield from _duplicate_keys(value_node, loc + (key,), source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, loc + (index,), source)


def _problem(error: dict[str, Any], root: yaml.Node, source: str, model: type[BaseModel]) -> ConfigProblem:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    context = error.get("ctx") or {}
    if kind == "duplicate_name" and "index" in context:
        loc = loc + (context["index"], "name")
    if kind == "extra_forbidden":
        key = loc[-1]
        message = f"unknown key {key!r}"
        suggestion = _suggest(str(key), _known_keys(model, loc[:-1]))
        if suggestion:
            message += f" (did you mean {suggestion!r}?)"
    node, key_node = _find(root, loc)
    line_node = key_node if kind == "extra_forbidden" and key_node is not None else node
    return ConfigProblem(source, line_node.start_mark.line + 1, format_path(loc), message)


def _find(root: yaml.Node, loc: Loc) -> tuple[yaml.Node, yaml.Node | None]:
    """The deepest node along `loc` (and the key node naming it), for the error's line number."""
    node, key_node = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == part:
                    node, key_node = v, k
                    break
            else:
                return node, key_node
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node, key_node = node.value[part], None
        else:
            return node, key_node
    return node, key_node


def _known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the model accepts at `loc`, following nested models through lists."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = _field(current, str(part))
        if field is None:
            return []
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _field(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _inner_model(annotation: Any) -> Any:
    """The pydantic model inside `list[M] | None` and the like, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _suggest(key: str, known: list[str]) -> str | None:
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return matches[0] if matches else None
