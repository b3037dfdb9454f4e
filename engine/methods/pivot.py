"""PivotMerge -- OUR RECONSTRUCTION from the abstract of arXiv 2604.22823 (no code was released).

Merges the cross-modal projectors of K expert MLLMs around a pivot (METHODS.md "PivotMerge", docs/pivotmerge.md):
1. pivot: experts' `mean` [default], a shared initialisation (`init`, passed as `base`) or one expert
   (`model:<name>`, the engine passes that expert as `base`); Delta_k = W_k - W_pivot.
2. shared space: U_s = top left singular vectors of [Delta_1 ... Delta_K] holding a fraction `energy` [0.9] of
   the energy, V_s likewise from the vertical stack; C_k = U_s^T Delta_k V_s.
3. filtering: a sign per entry of C elected across experts by majority (`sign_weight: count`; energy-weighted
   votes are options -- around a mean pivot they let a lone dissenter win); minority-sign entries (and exact
   ties) are zeroed; residuals
   R_k = Delta_k - U_s C_k V_s^T keep their top `density` [0.2] fraction by magnitude, merged by disjoint mean.
4. weights lambda_k = softmax_k(z_k / T) [T = 1], z_k = a_k standardised per layer (`standardize`), a_k =
   ||C_k||^2 / ||Delta_k||^2 (`contribution: shared`, alias
   `data_free`) or precomputed alignment gains (`contribution: data`, per-model parameter `gain`).
5. W = W_pivot + beta * (U_s (sum_k lambda_k C~_k) V_s^T + merged residual) [beta = 1; `scale` is the recipe
   name of the same factor (issue 6's recipe form), give one of the two].
A layer's bias: b_pivot + beta * sum_k lambda_k Delta b_k with its weight's lambda (`layer_weight`); other 0-D/1-D
tensors: W_pivot + beta * mean_k(Delta_k) (the experts' mean when pivot = mean and beta = 1).

`pivot_merge` is the pure function that also returns the per-layer report; the registered `merge` returns the
tensor only and the spec's `merge_with_report` returns both, which shardmerge.engine.run.unit uses to
collect the per-layer report. Registered as `pivot` (the recipe form, planned by shardmerge.engine.plan.forms.pivot) and, for the
callers written before the rename, `pivotmerge`.

Kernel path (issue 6): for CUDA coordinates, when Triton imports, the noise-floor / sign-election / suppression /
lambda-weighted combine (steps 3 and 5) is one fused call, `shardmerge.kernels.pivot_filter.pivot_filter_coords` (its torch reference
repeats `_sign_filter` operation for operation; tests/kernels/test_pivot_kernel.py pins them together); elsewhere the torch
path below runs. Both give the merge and the conflict count of `_filter_combine`. `_trim_disjoint_mean` is still
plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, MethodSpec, Param, TensorInfo, matrix_shape, whole_data_bytes
from shardmerge.engine.methods.rsvd import DEFAULT_SEED, PATHS, energy_rank, truncated_svd
from shardmerge.engine.methods.svd import _where, stack_inputs, svd_options
from shardmerge.kernels._util import use_triton
from shardmerge.kernels.pivot_filter import pivot_filter_coords, triton_available

SIGN_WEIGHTS = ("expert_energy", "entry_energy", "magnitude", "count")
CONTRIBUTIONS = ("shared", "data_free", "data")  # data_free = shared (the recipe spelling)
NOISE_RTOL = 10.0  # |C| <= this * max(m, n) * eps32 * max|C| is rounding noise: it neither votes nor conflicts
TIE_RTOL = 1e-5  # |vote sum| at most this fraction of sum |votes| is a tie (float32 rounding of exact ties)
NO_GAIN = float("nan")  # per-model `gain` default: "not given" (only contribution: data needs gains)
NO_SCALE = float("nan")  # `scale` default: "not given" (beta applies)
SPREAD_FLOOR = 0.05  # contributions whose std over experts is below this fraction of their mean |a| count as ~equal


@dataclass(frozen=True)
class PivotParams:
    """Every choice of the reconstruction, with METHODS.md's defaults (see docs/pivotmerge.md)."""

    pivot: str = "mean"  # mean | init | model:<name>
    energy: float = 0.9  # rho: energy fraction kept by the shared bases
    rank: int = 0  # > 0: fixed shared rank on both sides instead of the energy rule
    density: float = 0.2  # fraction of each residual's entries kept (by magnitude)
    sign_weight: str = "count"  # an expert's vote: 1 (majority) | ||C_k||^2 | its entry's C^2 | C (TIES)
    temperature: float = 1.0  # T of the softmax over experts (of the standardised contributions by default)
    standardize: bool = True  # lambda = softmax(z / T), z = contributions standardised per layer across experts
    spread_floor: float = SPREAD_FLOOR  # relative spread (std / mean |a| over experts) below which a_k count as ~equal
    beta: float = 1.0  # scale of the merged update
    scale: float = NO_SCALE  # the recipe name of beta (issue 6); NaN = not given
    contribution: str = "shared"  # shared / data_free (data-free a_k) | data (precomputed alignment gains)
    svd_path: str = "auto"
    seed: int = DEFAULT_SEED

    def validate(self, where: str) -> None:
        """Raise ValueError naming the tensor and the bad value (never assert)."""
        checks = [
            (
                self.pivot in ("mean", "init") or (self.pivot.startswith("model:") and len(self.pivot) > 6),
                "pivot",
                "'mean', 'init' or 'model:<name>'",
            ),
            (0.0 < self.energy <= 1.0, "energy", "in (0, 1]"),
            (isinstance(self.rank, int) and self.rank >= 0, "rank", "an integer >= 0 (0 = energy rule)"),
            (0.0 <= self.density <= 1.0, "density", "in [0, 1]"),
            (self.sign_weight in SIGN_WEIGHTS, "sign_weight", f"one of {SIGN_WEIGHTS}"),
            (self.temperature > 0 and math.isfinite(self.temperature), "temperature", "> 0"),
            (isinstance(self.standardize, bool), "standardize", "true or false"),
            (self.spread_floor > 0 and math.isfinite(self.spread_floor), "spread_floor", "> 0"),
            (math.isfinite(self.beta), "beta", "finite"),
            (self.contribution in CONTRIBUTIONS, "contribution", f"one of {CONTRIBUTIONS}"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"pivot: {where}: {name} must be {expected}, got {getattr(self, name)!r}")
        if not math.isnan(self.scale) and (not math.isfinite(self.scale) or self.beta != 1.0):
            raise ValueError(
                f"pivot: {where}: scale must be finite and given instead of beta (they are the same "
                f"factor), got scale={self.scale!r}, beta={self.beta!r}"
            )

    @property
    def factor(self) -> float:
        """beta of step 5: `scale` when given, else `beta`."""
        return self.beta if math.isnan(self.scale) else self.scale


def resolve_pivot(stack: torch.Tensor, base: torch.Tensor | None, mode: str, where: str) -> torch.Tensor:
    """The reference point W_pivot: experts' mean, or the `base` the engine passed for init / model:<name>."""
    if mode == "mean":
        return stack.mean(dim=0)
    if base is None:
        raise ValueError(
            f"pivot: {where}: pivot {mode!r} needs the pivot weights passed as base; for 'init' set the shared "
            "initialisation checkpoint, for 'model:<name>' name one of the experts"
        )
    return base


def shared_bases(deltas: torch.Tensor, p: PivotParams, svd: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """U_s (m, r_u) and V_s (n, r_v) from the horizontal / vertical stacks of deltas (K, m, n), with their stats."""
    K, m, n = deltas.shape
    hstack = deltas.permute(1, 0, 2).reshape(m, K * n)  # [Delta_1 ... Delta_K]
    vstack = deltas.reshape(K * m, n)  # [Delta_1; ...; Delta_K]
    U, Su, _ = truncated_svd(hstack, min(hstack.shape), **svd)
    _, Sv, Vh = truncated_svd(vstack, min(vstack.shape), **svd)
    r_u = min(p.rank, Su.numel()) if p.rank else energy_rank(Su, p.energy)
    r_v = min(p.rank, Sv.numel()) if p.rank else energy_rank(Sv, p.energy)

    def captured(S: torch.Tensor, r: int) -> float:
        total = float(S.double().square().sum())
        return float(S[:r].double().square().sum()) / total if total > 0 else 1.0

    stats = {"rank_u": r_u, "rank_v": r_v, "energy_u": captured(Su, r_u), "energy_v": captured(Sv, r_v)}
    return U[:, :r_u], Vh[:r_v].mT, stats


def _noise_floor(C: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The rounding-noise level of C (K, r_u, r_v) projected from m x n deltas: NOISE_RTOL * max(m, n) * eps32 *
    max|C| (an orthogonal expert's coordinates are ~50 eps32 max|C| noise, measured); float32, 0-dim."""
    if not C.numel():
        return torch.zeros((), dtype=C.dtype, device=C.device)
    return NOISE_RTOL * max(m, n) * torch.finfo(torch.float32).eps * C.abs().amax()


def _sign_filter(C: torch.Tensor, floor: torch.Tensor, sign_weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """C~ (minority-sign entries zeroed) and the conflict mask: conflict[k, i, j] = |C[k, i, j]| above `floor`
    and its sign not the strict weighted majority. A tie (|score| <= TIE_RTOL * sum |votes|) elects no sign:
    every entry above the floor there is a conflict -- with K = 2 and pivot = mean (Delta_2 = -Delta_1) the shared
    part cancels to 0 instead of keeping one side chosen by rounding. The torch path (CPU, or CUDA without Triton);
    shardmerge.kernels.pivot_filter.pivot_filter_coords_reference repeats these operations for the fused kernel."""
    real = C.abs() > floor
    sign = torch.where(real, C.sign(), torch.zeros_like(C))
    if sign_weight == "expert_energy":
        vote = sign * C.square().sum(dim=(1, 2))[:, None, None]
    else:
        vote = {"entry_energy": sign * C.square(), "magnitude": sign * C.abs(), "count": sign}[sign_weight]
    score = vote.sum(dim=0)
    tie = score.abs() <= TIE_RTOL * vote.abs().sum(dim=0)
    elected = torch.where(tie, torch.zeros_like(score), score.sign())
    conflict = real & (sign * elected <= 0)
    return torch.where(conflict, torch.zeros_like(C), C), conflict


def _project_filter(deltas: torch.Tensor, U_s: torch.Tensor, V_s: torch.Tensor, sign_weight: str):
    """C_k = U_s^T Delta_k V_s, C~_k and the per-entry conflict mask (see `_sign_filter`): the unfused steps,
    for callers that need the mask itself; `pivot_merge` combines through `_filter_combine`."""
    C = U_s.mT @ deltas @ V_s  # (K, r_u, r_v)
    C_f, conflict = _sign_filter(C, _noise_floor(C, *deltas.shape[-2:]), sign_weight)
    return C, C_f, conflict


def _use_kernel(C: torch.Tensor) -> bool:
    """The fused Triton filter runs for CUDA coordinates when Triton imports; the torch path otherwise."""
    return use_triton([C]) and triton_available()


def _filter_combine(C: torch.Tensor, lam: torch.Tensor, shape, sign_weight: str) -> tuple[torch.Tensor, int]:
    """sum_k lambda_k C~_k (r_u, r_v) and the number of entries of C zeroed as conflicts. lambda comes from the
    contributions a_k, which use C (not C~), so the filter runs after them, fused with the combine on CUDA."""
    floor = _noise_floor(C, *shape)
    if _use_kernel(C):
        merged, conflicts = pivot_filter_coords(C, lam, floor=floor, sign_weight=sign_weight, tie_rtol=TIE_RTOL)
        return merged.to(C.dtype), int(conflicts)
    C_f, conflict = _sign_filter(C, floor, sign_weight)
    return (lam[:, None, None] * C_f).sum(dim=0), int(conflict.sum())


def _trim_disjoint_mean(residuals: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each residual's top `density` fraction of entries by |value| (exact count, floor), then average each
    entry over the experts that kept it (disjoint mean; 0 where none did). Swap point for kernels/pivot_filter.py."""
    K = residuals.shape[0]
    flat = residuals.reshape(K, -1)
    keep_n = int(density * flat.shape[1])
    if keep_n >= flat.shape[1]:
        kept = flat
    else:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if keep_n > 0:
            mask.scatter_(1, flat.abs().topk(keep_n, dim=1).indices, True)
        kept = torch.where(mask, flat, torch.zeros_like(flat))
    count = (kept != 0).sum(dim=0).clamp_min(1)
    return (kept.sum(dim=0) / count).reshape(residuals.shape[1:])


def standardized(contribution: torch.Tensor, spread_floor: float = SPREAD_FLOOR, dim: int = 0) -> torch.Tensor:
    """z = (a - mean) / max(std, spread_floor * mean |a|) over experts (`dim`, population std): the contributions on
    a scale where a softmax at T = 1 follows them. Raw contributions live in [0, 1] (data-free) or are score
    differences of ~1e-3..1e-1 (data), so softmax(a) is near uniform whatever they say. The relative floor keeps
    differences of a few per cent, and rounding-level ones between equal contributions (std ~1e-7 of a ~1),
    from being blown up into decisive weights; all-zero contributions give z = 0 (uniform lambda)."""
    a = contribution.double()
    centred = a - a.mean(dim=dim, keepdim=True)
    floor = (spread_floor * a.abs().mean(dim=dim, keepdim=True)).clamp_min(1e-30)
    spread = torch.maximum(a.std(dim=dim, unbiased=False, keepdim=True), floor)
    return (centred / spread).to(contribution.dtype)


def layer_weights(
    contribution: torch.Tensor,
    temperature: float = 1.0,
    dim: int = 0,
    *,
    standardize: bool = False,
    spread_floor: float = SPREAD_FLOOR,
) -> torch.Tensor:
    """lambda_{k, l} = softmax over experts (`dim`) of a_{k, l} / T (or of the standardised z_{k, l} / T, see
    `standardized`; the merge's default); sums to 1 per layer."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not bool(torch.isfinite(contribution).all()):
        raise ValueError(f"contributions must be finite, got {contribution.tolist()}")
    a = standardized(contribution, spread_floor, dim) if standardize else contribution
    return torch.softmax(a.double() / temperature, dim=dim).to(contribution.dtype)


def shared_contribution(C: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Data-free a_k = ||U_s C_k V_s^T||^2 / ||Delta_k||^2 = ||C_k||^2 / ||Delta_k||^2 (0 for a zero update)."""
    num = C.double().square().flatten(1).sum(dim=1)
    den = deltas.double().square().flatten(1).sum(dim=1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def alignment_score(
    image_features: torch.Tensor,
    caption_embeddings: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    caption_mask: torch.Tensor | None = None,
):
    """Per-pair cosine between mean-pooled projected image features (N, P, d) and the caption's LLM token
    embeddings (N, T, d); masks (N, P) / (N, T) select the real tokens. The engine computes the inputs."""

    def pool(x, mask):
        if mask is None:
            return x.mean(dim=1)
        w = mask.to(x.dtype)[..., None]
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)

    return torch.nn.functional.cosine_similarity(
        pool(image_features, image_mask), pool(caption_embeddings, caption_mask), dim=-1
    )


def contrastive_scores(image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """Per-pair contrastive alignment of pooled image features (N, d) with pooled caption embeddings (N, d):
    cos(f_i, g_i) - mean_{j != i} cos(f_i, g_j), the matched caption against every mismatched one of the batch (the
    expectation over shuffled captions). An offset common to all captions (the gap between the image-feature and
    the token-embedding distributions) cancels; what is left is how much closer an image lies to its own caption."""
    N = image.shape[0]
    if N < 2 or caption.shape != image.shape:
        raise ValueError(
            f"contrastive_scores needs N >= 2 matched (N, d) rows, got {tuple(image.shape)} and {tuple(caption.shape)}"
        )
    f = torch.nn.functional.normalize(image.double(), dim=-1)
    g = torch.nn.functional.normalize(caption.double(), dim=-1)
    sim = f @ g.T
    matched = sim.diagonal()
    return matched - (sim.sum(dim=1) - matched) / (N - 1)


def alignment_gains(swapped_scores: torch.Tensor, pivot_scores: torch.Tensor) -> torch.Tensor:
    """a_{k, l} = mean over pairs of score(pivot projector with expert k's layer l) - score(pivot projector).

    swapped_scores (K, L, N), pivot_scores (L, N) -> (K, L); feed one column to `gain` or all to layer_weights."""
    if swapped_scores.dim() != 3 or tuple(swapped_scores.shape[1:]) != tuple(pivot_scores.shape):
        raise ValueError(
            f"alignment_gains expects swapped (K, L, N) and pivot (L, N) scores, got "
            f"{tuple(swapped_scores.shape)} and {tuple(pivot_scores.shape)}"
        )
    return (swapped_scores - pivot_scores[None]).mean(dim=-1)


def _contributions(C, deltas, p: PivotParams, gains: Sequence[float] | None, where: str) -> torch.Tensor:
    """a_k per expert: data-free shared share, or the engine's alignment gains (never silently ignored)."""
    K = deltas.shape[0]
    given = gains is not None and any(not math.isnan(float(g)) for g in gains)
    if p.contribution in ("shared", "data_free"):
        if given:
            raise ValueError(
                f"pivot: {where}: per-model gain {list(gains)} given but contribution is 'shared'; "
                "set contribution: data to use the gains"
            )
        return shared_contribution(C, deltas)
    if gains is None or len(gains) != K or not all(math.isfinite(float(g)) for g in gains):
        raise ValueError(
            f"pivot: {where}: contribution 'data' needs a finite alignment gain per expert ({K}), got {gains!r}; "
            "compute them with alignment_gains on calibration image-caption pairs"
        )
    return torch.tensor([float(g) for g in gains], dtype=torch.float64)


def _weights_of(C, deltas, p: PivotParams, gains, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_k, z_k, lambda_k) of one projector layer: contributions, their standardised form (a when
    `standardize` is off) and the softmax weights."""
    a = _contributions(C, deltas, p, gains, where)
    z = standardized(a, p.spread_floor) if p.standardize else a
    return a, z, layer_weights(z, p.temperature)


def _layer_space(weights: torch.Tensor, weight_pivot: torch.Tensor, p: PivotParams, info, where: str, gains):
    """Steps 1, 2 and 4 on a layer's 2-D weight stack (K, m, n): deltas, U_s, V_s, their stats, C and the weights."""
    deltas = weights - weight_pivot
    U_s, V_s, stats = shared_bases(deltas, p, svd_options("pivot", info, p.svd_path, p.seed))
    C = U_s.mT @ deltas @ V_s  # (K, r_u, r_v)
    return deltas, U_s, V_s, stats, C, _weights_of(C, deltas, p, gains, where)


def _small_tensor(stack, pivot, p: PivotParams, report: dict, gains, layer_weight, info, where: str):
    """0-D / 1-D tensors: a layer's bias follows its weight's lambda-weighted combination (the weight's stack and
    pivot given as `layer_weight`, or the layer's data gains); anything else is W_pivot + beta * mean_k Delta_k."""
    deltas = stack - pivot
    if layer_weight is not None:
        w_stack, w_pivot = layer_weight
        *_, (a, z, lam) = _layer_space(w_stack, w_pivot, p, info, where, gains)
    elif p.contribution == "data":
        a, z, lam = _weights_of(None, deltas, p, gains, where)
    else:
        return pivot + p.factor * deltas.mean(dim=0), {**report, "kind": "averaged"}
    lam = lam.to(deltas.dtype)
    merged = pivot + p.factor * (lam.reshape(-1, *([1] * (deltas.dim() - 1))) * deltas).sum(dim=0)
    summary = f"follows its layer's lambda [{', '.join(f'{x:.3f}' for x in lam)}]"
    return merged, {
        **report,
        "kind": "bias",
        "summary": summary,
        "contribution": [float(x) for x in a],
        "contribution_z": [float(x) for x in z],
        "lambda": [float(x) for x in lam],
    }


def pivot_merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    gains: Sequence[float] | None = None,
    info: TensorInfo | None = None,
    layer_weight: tuple[torch.Tensor, torch.Tensor] | None = None,
    **params,
) -> tuple[torch.Tensor, dict]:
    """Merge one projector tensor and report what happened (pure: returns (merged float32, report dict)).

    report: pivot, rank_u/rank_v (shared rank kept), energy_u/energy_v (one-sided energy captured), energy_shared
    (sum ||C_k||^2 / sum ||Delta_k||^2), conflict_fraction (entries of C zeroed / all K r_u r_v entries),
    contribution (a_k), contribution_z (the standardised z_k the softmax sees), lambda (per expert, sums to 1),
    residual_kept (fraction of residual entries kept), summary (one log line); params with NaN ("not given") as
    None, so the report is strict JSON. `layer_weight` = (the K experts' 2-D weight stacked, its pivot) of the
    layer a 1-D tensor (bias) belongs to: the bias then takes that weight's lambda (`_small_tensor`).
    """
    where = _where(info)
    p = PivotParams(**params)
    p.validate(where)
    stack = stack_inputs("pivot", tensors, base, info, needs_base=False)
    pivot = resolve_pivot(stack, base, p.pivot, where)
    params = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(p).items()}
    report: dict = {"tensor": info.name if info is not None else None, "params": params}  # JSON: no NaN
    if stack.dim() < 3:
        return _small_tensor(stack, pivot, p, report, gains, layer_weight, info, where)
    deltas, U_s, V_s, stats, C, (a, z, lam) = _layer_space(stack, pivot, p, info, where, gains)
    residual = _trim_disjoint_mean(deltas - U_s @ C @ V_s.mT, p.density)
    lam = lam.to(C.dtype)
    combined, conflicts = _filter_combine(C, lam, deltas.shape[-2:], p.sign_weight)
    merged = pivot + p.factor * (U_s @ combined @ V_s.mT + residual)
    total_sq = float(deltas.double().square().sum())
    numel = deltas[0].numel()
    report.update(stats)
    report.update(
        {
            "kind": "svd",
            "energy_shared": float(C.double().square().sum()) / total_sq if total_sq > 0 else 1.0,
            "conflict_fraction": conflicts / C.numel() if C.numel() else 0.0,
            "contribution": [float(x) for x in a],
            "contribution_z": [float(x) for x in z],
            "lambda": [float(x) for x in lam],
            "residual_kept": min(numel, int(p.density * numel)) / numel,
        }
    )
    report["summary"] = (
        f"shared rank {stats['rank_u']}x{stats['rank_v']}, energy {stats['energy_u']:.3f}/"
        f"{stats['energy_v']:.3f} (shared {report['energy_shared']:.3f}), conflicting "
        f"{report['conflict_fraction']:.1%}, a [{', '.join(f'{x:.3g}' for x in a)}], "
        f"lambda [{', '.join(f'{x:.3f}' for x in lam)}]"
    )
    return merged, report


def split_layer_weight(tensors, params: dict) -> tuple[list, tuple | None, dict]:
    """The plan passes a projector bias as K bias inputs followed by its layer weight's K inputs (+ the weight's
    pivot for `init` / `model:<name>`), with `weight_inputs` = how many of those trail; split them off."""
    params = dict(params)
    n = int(params.pop("weight_inputs", 0) or 0)
    if not n:
        return list(tensors), None, params
    K = len(tensors) - n
    biases, weights = list(tensors[:K]), [t.float() for t in tensors[K:]]
    stack = torch.stack(weights[:K])
    w_pivot = stack.mean(dim=0) if len(weights) == K else weights[K]
    return biases, (stack, w_pivot), params


def merge_pivot(
    tensors,
    base,
    *,
    stats=None,
    chunk: Chunk | None = None,
    info: TensorInfo | None = None,
    gain: Sequence[float] | None = None,
    **params,
) -> torch.Tensor:
    """Registered entry: `pivot_merge` without the report (see the module doc for the report hook)."""
    return merge_pivot_report(tensors, base, info=info, gain=gain, **params)[0]


def merge_pivot_report(
    tensors,
    base,
    *,
    stats=None,
    chunk: Chunk | None = None,
    info: TensorInfo | None = None,
    gain: Sequence[float] | None = None,
    **params,
) -> tuple[torch.Tensor, dict]:
    """The spec's `merge_with_report`: the registered signature, returning (merged tensor, report dict)."""
    tensors, layer_weight, params = split_layer_weight(tensors, params)
    return pivot_merge(tensors, base, gains=gain, info=info, layer_weight=layer_weight, **params)


_DOCS = {
    "pivot": "mean | init | model:<name>: the reference point W_pivot",
    "energy": "energy fraction kept by the shared bases",
    "rank": "> 0: fixed shared rank on both sides instead of the energy rule",
    "density": "fraction of each residual's entries kept (by magnitude)",
    "sign_weight": "an expert's vote in the sign election",
    "temperature": "T of the softmax over experts (of the standardised contributions by default)",
    "standardize": "softmax of the contributions standardised per layer across experts (false: raw a / T)",
    "spread_floor": "relative spread (std / mean |a|) below which contributions count as nearly equal",
    "beta": "scale of the merged update",
    "scale": "the recipe name of beta (give one of them)",
    "contribution": "shared / data_free (data-free weights) or data (calibrated gains)",
    "svd_path": "decomposition path (shardmerge.engine.methods.rsvd)",
    "seed": "seed of randomized decompositions",
}
_RANGES = {
    "energy": dict(lo=0, lo_open=True, hi=1),
    "rank": dict(lo=0),
    "density": dict(lo=0, lo_open=True, hi=1),
    "temperature": dict(lo=0, lo_open=True),
    "spread_floor": dict(lo=0, lo_open=True),
    "sign_weight": dict(choices=SIGN_WEIGHTS),
    "contribution": dict(choices=CONTRIBUTIONS),
    "svd_path": dict(choices=PATHS),
}


def _params() -> tuple[Param, ...]:
    """PivotParams' fields as declared parameters (kind from the default), plus the per-model `gain`."""
    kinds = {bool: "bool", str: "str", int: "int", float: "float"}
    out = [Param("gain", default=NO_GAIN, per_model=True, doc="precomputed alignment gain (contribution: data)")]
    for name, default in asdict(PivotParams()).items():
        out.append(Param(name, kinds[type(default)], default, doc=_DOCS[name], **_RANGES.get(name, {})))
    return tuple(out)


def pivot_memory(shape: tuple, n_inputs: int, has_base: bool) -> int:
    """Peak bytes of one projector merge: the data, the stacked copy and full spectra of the horizontal
    (m x K n) and vertical (K m x n) stacks (24 a b + 40 a^2 each, a <= b; see shardmerge.engine.run.memory), summed although
    they run one after the other, because the allocator does not hand the first one's pages back in time."""
    data = whole_data_bytes(shape, n_inputs, has_base)
    if len(shape) < 2:
        return data
    m, n = matrix_shape(shape)
    k = max(1, n_inputs)
    stacks = [sorted((m, k * n)), sorted((k * m, n))]
    return data + 4 * k * m * n + sum(24 * a * b + 40 * a * a for a, b in stacks)


register(
    MethodSpec(
        name="pivot",
        merge=merge_pivot,
        needs_base=False,
        chunkwise=False,
        params=_params(),
        doc="PivotMerge (our reconstruction of arXiv 2604.22823): shared-space sign filtering around a pivot; "
        "projector-only recipe form (shardmerge.engine.plan.forms.pivot).",
        merge_with_report=merge_pivot_report,
        report="pivot",
        memory=pivot_memory,
        reference="https://arxiv.org/abs/2604.22823",
        aliases=("pivotmerge",),
    )
)
