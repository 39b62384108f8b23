"""The compression pipeline spec: a short text such as ``"topk:0.01,q:8;bias=none"``.

A spec is a default pipeline, optionally followed by per-layer rules, each
after a semicolon: ``PIPELINE;SELECTOR=PIPELINE;SELECTOR=PIPELINE``. A tensor
takes the pipeline of the first rule whose selector matches it, and the
default pipeline when none does (see `LayerRule`).

A pipeline is up to three comma-separated stages, in this order: at most one
sparsifier (or the low-rank reducer), then at most one value coder (raw
float32 when none is named), then optionally ``zstd``. Spaces around tokens
are ignored.

Sparsifiers, which choose the entries that are sent:

- ``topk:FRACTION``: keep the ``max(1, ceil(FRACTION * total_numel))``
  largest-magnitude entries of the whole update, with one threshold across all
  tensors (model scope), and ``0 < FRACTION <= 1`` written as a decimal number.
  ``topk:FRACTION:model`` is the same spec.
- ``topk:FRACTION:tensor``: keep the ``max(1, ceil(FRACTION * numel))``
  largest-magnitude entries of each tensor separately (tensor scope).
- ``randk:FRACTION``: keep ``max(1, ceil(FRACTION * numel))`` entries of each
  tensor drawn at random from a seed that the body carries, scaled by
  ``numel / k``. It has no scope word: k is always per tensor.
- ``thresh:TAU``: keep the entries with ``|x| >= TAU``, ``TAU > 0`` decimal.

Low-rank reducer, in the sparsifier's place:

- ``lowrank:RANK``: PowerSGD-style rank-``RANK`` factors ``P`` and ``Q`` of
  each tensor with ``ndim >= 2``, seen as a ``shape[0] x prod(shape[1:])``
  matrix; the value coder codes the factors. A tensor with ``ndim < 2``, or
  one where ``RANK * (m + n) >= m * n``, is sent densely through the value
  coder instead. ``RANK`` is 1 to 65535.

Value coders, which code the kept values (all values without a sparsifier):

- ``none`` (alias ``float32``): raw float32. Written alone, or as ``none,zstd``;
  after a sparsifier, leave the value coder out instead.
- ``q:BITS``, ``q:BITS:BLOCK``, ``q:BITS:nearest``, ``q:BITS:BLOCK:nearest``:
  uniform quantization to ``BITS`` bits (1 to 8), with one scale per tensor or
  one per ``BLOCK`` values (``BLOCK >= 2``). Rounding is stochastic unless the
  last argument is the word ``nearest``; ``stochastic`` is accepted there and
  left out of canonical text. A block size is always digits and a rounding mode
  always a word, so the two never read as each other.
- ``qsgd:LEVELS`` or ``qsgd:LEVELS:BLOCK``: QSGD with ``LEVELS`` levels (1 to
  127) per L2 norm, one norm per tensor or per ``BLOCK`` values.
- ``sign``: scaled sign, 1 bit per value and the mean magnitude. Not after a
  sparsifier, where the same code is ``ternary``.
- ``ternary``: sparse ternary compression, only after a sparsifier.
- ``fp16``, ``bf16``: 16-bit float casts.

Lossless, last:

- ``zstd`` or ``zstd:LEVEL``: zstandard compression of each tensor body, level
  1 to 19 (default 3).

Each stage appears at most once.

Per-layer rules, ``SELECTOR=PIPELINE``, where the selector is one of:

- ``bias``: a 1-d tensor whose name ends with ``bias``;
- ``vector``: a tensor with ``ndim <= 1`` (biases, norm scales, scalars);
- ``small:N``: a tensor with fewer than ``N`` elements, ``N >= 1``;
- anything else: a case-sensitive glob over the tensor name (Python's
  ``fnmatch.fnmatchcase``: ``*`` any run of characters, dots included, ``?``
  one character, ``[seq]`` and ``[!seq]`` character sets). A tensor literally
  named ``bias`` is matched by the glob ``[b]ias``.

Selectors contain no whitespace, ``;`` or ``=``, and each appears at most
once. A rule's pipeline has the grammar above and no rules of its own.
"""

import fnmatch
import math
import re
from typing import Any, Literal

import pydantic

SPARSIFIERS = ("topk", "randk", "thresh", "lowrank")
VALUE_CODERS = ("none", "q", "qsgd", "sign", "ternary", "fp16", "bf16")
LOSSLESS = ("zstd",)
KNOWN_STAGES = SPARSIFIERS + VALUE_CODERS + LOSSLESS
SIMPLE_CODERS = ("sign", "ternary", "fp16", "bf16")
ROUNDINGS = ("stochastic", "nearest")
TOPK_SCOPES = ("model", "tensor")
DEFAULT_TOPK_SCOPE = "model"
DEFAULT_ROUNDING = "stochastic"
VALID_EXAMPLE = "topk:0.01,q:8"
RULES_EXAMPLE = "topk:0.01,q:8;bias=none;*norm*=q:8"
# Default uplink: rank-2 factors with 4-bit values, 107x below float32 for the
# HAR CNN. It loses less accuracy than top-k 1% with 8-bit values (119x), most
# of all when phones report rarely. docs/benchmarks.md has the measurements.
DEFAULT_UPLINK = "lowrank:2,q:4"
# Default downlink: 4-bit values, 7.8x below float32. The server sends the
# delta against the model a phone rebuilt when it still has that model, else
# the whole model. The HAR main job ends about 0.2 accuracy points below a
# float32 downlink, and a phone on a slow link waits half as long for the
# model as under 8 bits. docs/benchmarks.md has the measurements.
DEFAULT_DOWNLINK = "q:4"
MIN_BITS, MAX_BITS = 1, 8
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 2, 2**31 - 1
MIN_QSGD_LEVELS, MAX_QSGD_LEVELS = 1, 127
MIN_ZSTD_LEVEL, MAX_ZSTD_LEVEL = 1, 19
MIN_RANK, MAX_RANK = 1, 2**16 - 1
RULE_SEPARATOR = ";"
# Value coders that may code low-rank factors: sign and ternary would keep only
# the factors' signs, which no longer span the update's column space.
LOWRANK_VALUE_CODERS = ("none", "q", "qsgd", "fp16", "bf16")
DEFAULT_ZSTD_LEVEL = 3

# Stage groups in pipeline order; a token's group may not be below an earlier one's.
_GROUP = {name: 0 for name in SPARSIFIERS} | {name: 1 for name in VALUE_CODERS} | {"zstd": 2}

# Only plain decimal numbers, so that clients in other languages parse the same
# fractions as Python does (float() alone would also take "nan", "inf" and "1_0").
_DECIMAL = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"\d{1,12}")
_WHITESPACE = re.compile(r"\s")


class CompressionSpec(pydantic.BaseModel):
    """A parsed compression pipeline.

    Build one with `parse_compression_spec`, or let pydantic validate a spec text
    wherever a `CompressionSpec` field is declared. All fields at their
    defaults means raw float32 (``"none"``).

    Attributes
    ----------
    topk_fraction : float or None
        Fraction of the entries that top-k keeps, in (0, 1]. Smaller sends
        fewer bytes and delays more of the update to later rounds through the
        error-feedback residual.
    topk_scope : {"model", "tensor"}
        Range of the top-k selection. ``"model"`` (default) ranks all tensors'
        entries together, so the byte budget goes to the tensors whose updates
        are largest, and a tensor may keep no entries. ``"tensor"`` keeps the
        fraction of every tensor, at least one entry each. On a federated HAR
        CNN (24 clients, 20 rounds, error feedback), model scope reached 0.942
        held-out accuracy against 0.918 for tensor scope at the same bytes.
        Only ``"model"`` is allowed without ``topk_fraction``.
    randk_fraction : float or None
        Fraction of each tensor's entries that random-k keeps, in (0, 1]. The
        kept values are scaled by ``numel / k``, which makes the update
        unbiased but multiplies its variance by up to ``numel / k``.
    threshold : float or None
        Magnitude threshold TAU > 0: entries with ``|x| >= TAU`` are kept. The
        number of entries sent, and so the bytes, follows the update's scale,
        so TAU must be tuned to it (a few times the typical entry works).
    lowrank_rank : int or None
        Rank of the PowerSGD-style factors, 1 to 65535. A ``m x n`` matrix
        costs ``rank * (m + n)`` values instead of ``m * n``; rank 1 to 4
        usually suffices with error feedback, which low-rank needs because it
        is biased. Tensors that low-rank would not shrink are sent densely.
    bits : int or None
        Quantization width, 1 to 8. Each bit fewer halves the number of levels
        and roughly doubles the rounding noise.
    rounding : {"stochastic", "nearest"}
        Rounding of the ``q`` stage. ``"stochastic"`` (default) is unbiased;
        ``"nearest"`` halves the worst-case error but is biased, so use it with
        error feedback. Only ``"stochastic"`` is allowed without ``bits``.
    qsgd_levels : int or None
        QSGD levels per norm, 1 to 127, sent as ``1 + bit_length(levels)`` bits
        per value (sign and level). More levels lower the variance.
    block_size : int or None
        Values per quantization scale of ``q`` or norm of ``qsgd``. ``None``
        means one per tensor. Smaller blocks follow the local range more
        tightly but cost 8 bytes (``q``: min and scale) or 4 bytes (``qsgd``:
        norm) per block, so 128 to 1024 suits most layers.
    coder : {"sign", "ternary", "fp16", "bf16"} or None
        A value coder without parameters.
    zstd_level : int or None
        zstandard level, 1 to 19, or None for no lossless stage. Higher levels
        compress slightly better and encode slower; decoding speed hardly changes.
    rules : tuple of LayerRule
        Per-layer rules, tried in order; the first whose selector matches a
        tensor gives its pipeline, and the fields above apply to the rest.
        Rules' pipelines have no rules of their own.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    topk_fraction: float | None = pydantic.Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    topk_scope: Literal["model", "tensor"] = DEFAULT_TOPK_SCOPE
    randk_fraction: float | None = pydantic.Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    threshold: float | None = pydantic.Field(default=None, gt=0.0, allow_inf_nan=False)
    bits: int | None = pydantic.Field(default=None, ge=MIN_BITS, le=MAX_BITS, strict=True)
    rounding: Literal["stochastic", "nearest"] = DEFAULT_ROUNDING
    qsgd_levels: int | None = pydantic.Field(
        default=None, ge=MIN_QSGD_LEVELS, le=MAX_QSGD_LEVELS, strict=True
    )
    block_size: int | None = pydantic.Field(
        default=None, ge=MIN_BLOCK_SIZE, le=MAX_BLOCK_SIZE, strict=True
    )
    coder: Literal["sign", "ternary", "fp16", "bf16"] | None = None
    zstd_level: int | None = pydantic.Field(
        default=None, ge=MIN_ZSTD_LEVEL, le=MAX_ZSTD_LEVEL, strict=True
    )
    lowrank_rank: int | None = pydantic.Field(default=None, ge=MIN_RANK, le=MAX_RANK, strict=True)
    rules: tuple["LayerRule", ...] = ()

    @pydantic.model_validator(mode="before")
    @classmethod
    def _parse_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            return _parse_fields(data)
        return data

    @pydantic.model_validator(mode="after")
    def _check_block_needs_bits(self) -> "CompressionSpec":
        if self.block_size is not None and self.bits is None and self.qsgd_levels is None:
            raise ValueError(
                f"block_size {self.block_size} needs bits or qsgd_levels; "
                "example of a valid spec: 'q:4:256'"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _check_scope_needs_topk(self) -> "CompressionSpec":
        if self.topk_scope != DEFAULT_TOPK_SCOPE and self.topk_fraction is None:
            raise ValueError(
                f"topk_scope {self.topk_scope!r} needs topk_fraction; "
                "example of a valid spec: 'topk:0.01:tensor'"
            )
        if self.rounding != DEFAULT_ROUNDING and self.bits is None:
            raise ValueError(
                f"rounding {self.rounding!r} needs bits; example of a valid spec: 'q:8:nearest'"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _check_combination(self) -> "CompressionSpec":
        sparsifiers = [
            name
            for name, value in (
                ("topk", self.topk_fraction),
                ("randk", self.randk_fraction),
                ("thresh", self.threshold),
                ("lowrank", self.lowrank_rank),
            )
            if value is not None
        ]
        if len(sparsifiers) > 1:
            raise ValueError(
                f"a pipeline has at most one sparsifier, got {' and '.join(sparsifiers)}: "
                "a second selection would only drop more of the first one's entries"
            )

        coders = [
            name
            for name, value in (("q", self.bits), ("qsgd", self.qsgd_levels), (self.coder, self.coder))
            if value is not None
        ]
        if len(coders) > 1:
            raise ValueError(
                f"a pipeline has exactly one value coder, got {' and '.join(coders)}: "
                "each one codes float values, not another coder's codes"
            )

        if self.lowrank_rank is not None and self.coder in ("sign", "ternary"):
            raise ValueError(
                f"{self.coder!r} cannot code low-rank factors: the factors' signs alone do not "
                f"span the update; write one of {', '.join(LOWRANK_VALUE_CODERS)}, "
                "as in 'lowrank:2,q:8'"
            )
        if self.coder == "ternary" and not sparsifiers:
            raise ValueError(
                "'ternary' codes the values a sparsifier kept and needs one before it, "
                "as in 'topk:0.01,ternary'; for a dense update write 'sign'"
            )
        if self.coder == "sign" and sparsifiers:
            raise ValueError(
                f"'sign' after {sparsifiers[0]!r} is sparse ternary compression; write 'ternary'"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _check_rules(self) -> "CompressionSpec":
        seen: dict[str, int] = {}
        for position, rule in enumerate(self.rules, start=1):
            if rule.pipeline.rules:
                raise ValueError(
                    f"rule {position} ({rule.selector!r}) has rules of its own; a rule's pipeline "
                    f"is a plain pipeline such as 'q:8'. Example of a valid spec: {RULES_EXAMPLE!r}"
                )
            if rule.selector in seen:
                raise ValueError(
                    f"rule {position} repeats selector {rule.selector!r} of rule "
                    f"{seen[rule.selector]}, so it would never match; remove one of them"
                )
            seen[rule.selector] = position
        return self

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Stage names in pipeline order; ``("none",)`` for raw float32, and
        ``("none", "zstd")`` for raw float32 under zstd."""
        names = []
        if self.topk_fraction is not None:
            names.append("topk")
        if self.randk_fraction is not None:
            names.append("randk")
        if self.threshold is not None:
            names.append("thresh")
        if self.lowrank_rank is not None:
            names.append("lowrank")
        if self.bits is not None:
            names.append("q")
        if self.qsgd_levels is not None:
            names.append("qsgd")
        if self.coder is not None:
            names.append(self.coder)
        if not names:
            names.append("none")
        if self.zstd_level is not None:
            names.append("zstd")
        return tuple(names)

    def canonical(self) -> str:
        """Return the canonical text, for which ``parse_compression_spec`` returns an equal spec."""
        rules = "".join(
            f"{RULE_SEPARATOR}{rule.selector}={rule.pipeline.canonical()}" for rule in self.rules
        )
        return self._pipeline_canonical() + rules

    @property
    def default_pipeline(self) -> "CompressionSpec":
        """The pipeline for tensors that no rule matches: this spec without its rules."""
        return self.model_copy(update={"rules": ()}) if self.rules else self

    def pipeline_for(self, name: str, shape: tuple[int, ...]) -> tuple[int, "CompressionSpec"]:
        """Return ``(rule position, pipeline)`` of the first rule matching a tensor.

        Position 0 is the default pipeline, rule ``i`` (counted from 1) is
        position ``i``. The decision uses only the name and the shape, which
        the reader knows from the expected model, so the body needs no tag.
        """
        for position, rule in enumerate(self.rules, start=1):
            if rule.matches(name, shape):
                return position, rule.pipeline
        return 0, self.default_pipeline

    def _pipeline_canonical(self) -> str:
        tokens = []
        if self.topk_fraction is not None:
            scope = "" if self.topk_scope == DEFAULT_TOPK_SCOPE else f":{self.topk_scope}"
            tokens.append(f"topk:{self.topk_fraction!r}{scope}")
        if self.randk_fraction is not None:
            tokens.append(f"randk:{self.randk_fraction!r}")
        if self.threshold is not None:
            tokens.append(f"thresh:{self.threshold!r}")
        if self.lowrank_rank is not None:
            tokens.append(f"lowrank:{self.lowrank_rank}")

        block = "" if self.block_size is None else f":{self.block_size}"
        if self.bits is not None:
            rounding = "" if self.rounding == DEFAULT_ROUNDING else f":{self.rounding}"
            tokens.append(f"q:{self.bits}{block}{rounding}")
        if self.qsgd_levels is not None:
            tokens.append(f"qsgd:{self.qsgd_levels}{block}")
        if self.coder is not None:
            tokens.append(self.coder)
        if not tokens:
            tokens.append("none")

        if self.zstd_level is not None:
            level = "" if self.zstd_level == DEFAULT_ZSTD_LEVEL else f":{self.zstd_level}"
            if tokens == ["none"]:
                tokens = []
            tokens.append(f"zstd{level}")
        return ",".join(tokens)

    def __str__(self) -> str:
        return self.canonical()


class LayerRule(pydantic.BaseModel):
    """One per-layer rule: tensors that `selector` matches use `pipeline`.

    Attributes
    ----------
    selector : str
        ``bias`` (1-d tensors whose name ends with ``bias``), ``vector``
        (``ndim <= 1``), ``small:N`` (fewer than N elements) or a
        case-sensitive ``fnmatch`` glob over the tensor name. Stored in
        canonical form (``small:08`` becomes ``small:8``).
    pipeline : CompressionSpec
        A pipeline without rules. ``none`` sends the tensor exactly.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    selector: str
    pipeline: CompressionSpec

    @pydantic.field_validator("selector")
    @classmethod
    def _canonical_selector(cls, selector: str) -> str:
        return _canonical_selector(selector)

    def matches(self, name: str, shape: tuple[int, ...]) -> bool:
        """Return whether this rule governs the tensor `name` of shape `shape`."""
        kind, _, argument = self.selector.partition(":")
        if kind == "bias" and not argument:
            return len(shape) == 1 and name.endswith("bias")
        if kind == "vector" and not argument:
            return len(shape) <= 1
        if kind == "small" and argument:
            return math.prod(shape) < int(argument)
        # fnmatchcase, not fnmatch: the latter folds case on Windows, and the
        # rule must resolve the same way on every reader.
        return fnmatch.fnmatchcase(name, self.selector)


CompressionSpec.model_rebuild()


def parse_compression_spec(text: str) -> CompressionSpec:
    """Parse a spec such as ``"topk:0.01,q:8"``, ``"lowrank:2,q:8;bias=none"`` or ``"sign,zstd"``.

    Raises
    ------
    ValueError
        Naming the bad token, why it is rejected, the allowed values and a valid example.
    """
    return CompressionSpec(**_parse_fields(text))


def _parse_fields(text: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ValueError(f"compression spec must be a string, got {type(text).__name__}")

    default, *rule_texts = text.split(RULE_SEPARATOR)
    fields = _parse_pipeline(text, default)
    if rule_texts:
        fields["rules"] = [_parse_rule(text, position, rule) for position, rule in enumerate(rule_texts, 1)]
    return fields


def _parse_rule(text: str, position: int, rule_text: str) -> dict[str, Any]:
    rule_text = rule_text.strip()
    if not rule_text:
        raise _rule_error(text, position, rule_text, "the rule is empty, so remove the stray ';'")

    selector, equals, pipeline = rule_text.partition("=")
    if not equals:
        raise _rule_error(
            text, position, rule_text, "a rule is SELECTOR=PIPELINE and this one has no '='"
        )
    try:
        selector = _canonical_selector(selector.strip())
    except ValueError as error:
        raise _rule_error(text, position, rule_text, str(error)) from error
    return {"selector": selector, "pipeline": _parse_pipeline(text, pipeline)}


def _canonical_selector(selector: str) -> str:
    """Return the canonical selector, or raise ValueError saying what is wrong with it."""
    if not selector:
        raise ValueError("the selector is empty; write bias, vector, small:N or a name glob")
    if _WHITESPACE.search(selector) or RULE_SEPARATOR in selector or "=" in selector:
        raise ValueError(f"selector {selector!r} contains whitespace, ';' or '='")

    kind, colon, argument = selector.partition(":")
    if kind in ("bias", "vector"):
        if colon:
            raise ValueError(f"selector class {kind!r} takes no argument; write {kind!r}")
        return kind
    if kind == "small":
        if not _INTEGER.fullmatch(argument) or int(argument) < 1:
            raise ValueError(
                f"selector 'small:N' needs N, an integer >= 1 (the element count below which "
                f"a tensor matches), got {argument!r}"
            )
        return f"small:{int(argument)}"
    return selector


def _rule_error(text: str, position: int, rule_text: str, problem: str) -> ValueError:
    return ValueError(
        f"invalid compression spec {_quoted(text)}, rule {position} {_quoted(rule_text)}: "
        f"{_shortened(problem)}. "
        f"Rules follow the default pipeline as ';SELECTOR=PIPELINE', where the selector is "
        f"bias, vector, small:N or a tensor-name glob. Example of a valid spec: {RULES_EXAMPLE!r}"
    )


def _parse_pipeline(text: str, pipeline_text: str) -> dict[str, Any]:
    tokens = [token.strip() for token in pipeline_text.split(",")]
    if tokens == [""]:
        raise _spec_error(text, "", "the spec is empty")

    fields: dict[str, Any] = {}
    seen: list[str] = []
    for token in tokens:
        name, _, argument_text = token.partition(":")
        arguments = argument_text.split(":") if argument_text else []
        stage = "none" if name == "float32" else name

        if not token:
            raise _spec_error(text, token, "the spec contains an empty token, so remove the stray comma")
        if stage not in KNOWN_STAGES:
            raise _spec_error(text, token, f"unknown stage {name!r}")
        if stage in seen:
            raise _spec_error(text, token, f"stage {stage!r} appears more than once")
        _check_order(text, token, stage, seen)
        seen.append(stage)
        fields.update(_parse_stage(text, token, stage, arguments))
    return fields


def _check_order(text: str, token: str, stage: str, seen: list[str]) -> None:
    group = _GROUP[stage]
    if "none" in seen and stage != "zstd":
        raise _spec_error(
            text, "none", "'none' cannot be combined with other stages, except a final 'zstd'"
        )
    if stage == "none" and seen:
        raise _spec_error(
            text,
            token,
            "'none' cannot be combined with other stages, except a final 'zstd'; "
            "after a sparsifier leave the value coder out for float32 values",
        )

    for previous in seen:
        if _GROUP[previous] > group:
            raise _spec_error(
                text,
                token,
                f"{stage!r} must come before {previous!r}: the sparsifier comes first, "
                "then the value coder, then zstd",
            )
        if _GROUP[previous] == group == 0:
            raise _spec_error(
                text,
                token,
                f"a pipeline has at most one sparsifier, got {previous!r} and {stage!r}",
            )
        if _GROUP[previous] == group == 1:
            raise _spec_error(
                text,
                token,
                f"a pipeline has exactly one value coder, got {previous!r} and {stage!r}",
            )
    if stage == "ternary" and not any(_GROUP[previous] == 0 for previous in seen):
        raise _spec_error(
            text,
            token,
            "'ternary' codes the values a sparsifier kept and needs one before it, "
            "as in 'topk:0.01,ternary'; for a dense update write 'sign'",
        )
    if stage in ("sign", "ternary") and "lowrank" in seen:
        raise _spec_error(
            text,
            token,
            f"{stage!r} cannot code low-rank factors: the factors' signs alone do not span "
            f"the update; write one of {', '.join(LOWRANK_VALUE_CODERS)}, as in 'lowrank:2,q:8'",
        )
    if stage == "sign" and seen:
        raise _spec_error(text, token, f"'sign' after {seen[0]!r} is sparse ternary compression; write 'ternary'")


def _parse_stage(text: str, token: str, stage: str, arguments: list[str]) -> dict[str, Any]:
    if stage in ("none", "sign", "ternary", "fp16", "bf16"):
        _check_argument_count(text, token, arguments, 0, 0, stage)
        return {} if stage == "none" else {"coder": stage}

    if stage == "topk":
        _check_argument_count(text, token, arguments, 1, 2, "topk:FRACTION or topk:FRACTION:tensor")
        fields: dict[str, Any] = {"topk_fraction": _parse_fraction(text, token, arguments[0])}
        if len(arguments) == 2:
            fields["topk_scope"] = _parse_scope(text, token, arguments[1])
        return fields

    if stage == "randk":
        if len(arguments) == 2 and arguments[1] in TOPK_SCOPES:
            raise _spec_error(
                text,
                token,
                "random-k draws k entries per tensor and takes no scope word; write 'randk:FRACTION'",
            )
        _check_argument_count(text, token, arguments, 1, 1, "randk:FRACTION")
        return {"randk_fraction": _parse_fraction(text, token, arguments[0])}

    if stage == "lowrank":
        _check_argument_count(text, token, arguments, 1, 1, "lowrank:RANK")
        return {"lowrank_rank": _parse_integer(text, token, "rank", arguments[0], MIN_RANK, MAX_RANK)}

    if stage == "thresh":
        _check_argument_count(text, token, arguments, 1, 1, "thresh:TAU")
        return {"threshold": _parse_threshold(text, token, arguments[0])}

    if stage == "q":
        rounding = None
        if arguments and arguments[-1] in ROUNDINGS:
            rounding = arguments.pop()
        _check_argument_count(
            text, token, arguments, 1, 2, "q:BITS, q:BITS:BLOCK, q:BITS:nearest or q:BITS:BLOCK:nearest"
        )
        fields = {"bits": _parse_integer(text, token, "bits", arguments[0], MIN_BITS, MAX_BITS)}
        if len(arguments) == 2:
            fields["block_size"] = _parse_integer(
                text, token, "block size", arguments[1], MIN_BLOCK_SIZE, MAX_BLOCK_SIZE
            )
        if rounding is not None:
            fields["rounding"] = rounding
        return fields

    if stage == "qsgd":
        _check_argument_count(text, token, arguments, 1, 2, "qsgd:LEVELS or qsgd:LEVELS:BLOCK")
        fields = {
            "qsgd_levels": _parse_integer(
                text, token, "levels", arguments[0], MIN_QSGD_LEVELS, MAX_QSGD_LEVELS
            )
        }
        if len(arguments) == 2:
            fields["block_size"] = _parse_integer(
                text, token, "block size", arguments[1], MIN_BLOCK_SIZE, MAX_BLOCK_SIZE
            )
        return fields

    _check_argument_count(text, token, arguments, 0, 1, "zstd or zstd:LEVEL")
    level = DEFAULT_ZSTD_LEVEL
    if arguments:
        level = _parse_integer(text, token, "zstd level", arguments[0], MIN_ZSTD_LEVEL, MAX_ZSTD_LEVEL)
    return {"zstd_level": level}


def _check_argument_count(
    text: str, token: str, arguments: list[str], least: int, most: int, form: str
) -> None:
    if least <= len(arguments) <= most:
        return
    raise _spec_error(text, token, f"expected the form {form!r}, got {len(arguments)} argument(s)")


def _parse_fraction(text: str, token: str, raw: str) -> float:
    allowed = "a decimal number in the range (0, 1], such as 0.01"
    if not _DECIMAL.fullmatch(raw):
        raise _spec_error(text, token, f"fraction {raw!r} is not {allowed}")

    fraction = float(raw)
    if not 0.0 < fraction <= 1.0:
        raise _spec_error(text, token, f"fraction {raw} is outside the allowed range (0, 1]")
    return fraction


def _parse_threshold(text: str, token: str, raw: str) -> float:
    if not _DECIMAL.fullmatch(raw):
        raise _spec_error(text, token, f"threshold {raw!r} is not a positive decimal number, such as 0.001")

    threshold = float(raw)
    if not 0.0 < threshold < math.inf:
        raise _spec_error(text, token, f"threshold {raw} must be above 0 and finite")
    return threshold


def _parse_scope(text: str, token: str, raw: str) -> str:
    if raw not in TOPK_SCOPES:
        raise _spec_error(
            text,
            token,
            f"top-k scope {raw!r} is invalid. Write 'tensor' for one top-k per tensor, "
            "or leave the scope out for one top-k over the whole model (also written 'model')",
        )
    return raw


def _parse_integer(text: str, token: str, field: str, raw: str, low: int, high: int) -> int:
    if not _INTEGER.fullmatch(raw):
        raise _spec_error(
            text, token, f"{field} {raw!r} is not an integer in the allowed range {low}..{high}"
        )

    value = int(raw)
    if not low <= value <= high:
        raise _spec_error(text, token, f"{field} {value} is outside the allowed range {low}..{high}")
    return value


def _quoted(text: str, limit: int = 200) -> str:
    # Specs can come from a payload header, so messages quote a bounded part.
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _shortened(problem: str, limit: int = 400) -> str:
    return problem if len(problem) <= limit else f"{problem[:limit]}..."


def _spec_error(text: str, token: str, problem: str) -> ValueError:
    return ValueError(
        f"invalid compression spec {_quoted(text)}, token {_quoted(token)}: {_shortened(problem)}. "
        f"Known stages: {', '.join(KNOWN_STAGES)}; at most one sparsifier "
        f"({', '.join(SPARSIFIERS)}), then one value coder, then zstd; q bits 1..8, "
        f"qsgd levels 1..127, fraction (0, 1], top-k scope tensor or model (default), "
        f"lowrank rank 1..{MAX_RANK}, block size >= 2, zstd level 1..19. "
        f"Example of a valid spec: {VALID_EXAMPLE!r}"
    )
