"""The calibration report: what was chosen for each layer and what it bought.

Per layer and expert: alpha, rank, the residual quantizer kept (GPTQ or RTN) with both output
errors, the chosen clip ratio per timestep bin, and the output SQNR against the BF16 layer on held
rows (rows of the reservoirs that no search saw) of plain RTN W4A4 ("before") and of the full
method ("after"). Written as JSON beside the states and logged as a short table.

Errors are kept as sums of squares with the reference energy beside them, so that every figure
merges by addition (bins into experts, layers into totals) - the same rule as the statistics.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from ..kernels import format as fmt

log = logging.getLogger(__name__)


def sqnr_from_sums(ref_energy: float, err_energy: float) -> float:
    """20 log10(||ref|| / ||ref - test||) from the two sums of squares (numerics.sqnr_db)."""
    if err_energy <= 0:
        return math.inf
    if ref_energy <= 0:
        return -math.inf
    return 10.0 * math.log10(ref_energy / err_energy)


@dataclasses.dataclass
class LayerRecord:
    """Everything measured for one layer of one expert. Lists run over the expert's bins;
    ``clip_fit`` / ``clip_eval`` are per-bin lists of errors over ``config.clip_grid`` (None for a
    bin without rows)."""

    name: str
    expert: str
    alpha: float
    rank: int
    unsigned: bool
    residual: str  # "gptq" or "rtn": the quantizer kept for the residual
    err_rtn: float  # output error of the method with an RTN residual (c = 1), fit rows, relative
    err_gptq: float | None  # same with the GPTQ residual (None when GPTQ is off)
    clip_fit: list  # [B] of list[float] | None
    clip_eval: list  # [B] of list[float] | None
    ref_eval: list  # [B] ||y_ref||^2 on the held rows
    plain_eval: list  # [B] error of plain RTN W4A4 (s = 1, rank 0, c = 1) on the held rows
    rows_fit: list  # [B]
    rows_eval: list  # [B]
    grid: tuple = ()  # config.clip_grid (the index space of the tables; not written to JSON)
    seconds: float = 0.0
    clip: list = dataclasses.field(default_factory=list)  # [B] chosen ratios (set by the policy)
    clip_source: list = dataclasses.field(default_factory=list)  # [B] "searched" / "bin j" (fallback)

    def sqnr(self) -> tuple[float, float]:
        """(SQNR of plain RTN W4A4, SQNR of the full method with the chosen clips) on held rows, dB."""
        ref = sum(self.ref_eval)
        plain = sum(self.plain_eval)
        full = 0.0
        for b, table in enumerate(self.clip_eval):
            if table is not None:
                full += table[self._grid_index(b)]
        return sqnr_from_sums(ref, plain), sqnr_from_sums(ref, full)

    def _grid_index(self, b: int) -> int:
        return self.grid.index(self.clip[b])

    def to_json(self) -> dict:
        before, after = self.sqnr()
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "grid"}
        d["sqnr_rtn_db"], d["sqnr_after_db"] = _finite(before), _finite(after)
        return d


def _finite(x: float):
    return x if math.isfinite(x) else (None if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def choose_clips(records: dict[str, dict[str, LayerRecord]], grid: tuple[float, ...], policy: str) -> dict:
    """Set ``record.clip`` for every layer of every expert by ``policy``; returns fallback notes.

    per_bin: the best c of each bin on its own rows; a bin without rows takes the ratio of its
    nearest bin with rows (ties: the higher-noise side), logged. per_expert: one c per layer and
    expert, by the error pooled over its bins. global: one c per layer for both experts.
    """
    def best(table):
        return min(range(len(grid)), key=lambda i: (table[i], -grid[i]))

    def pooled(tables):
        tables = [t for t in tables if t is not None]
        return [sum(t[i] for t in tables) for i in range(len(grid))] if tables else None

    notes = {}
    for expert, layers in records.items():
        for name, rec in layers.items():
            nb = len(rec.clip_fit)
            if policy == "per_bin":
                full = [None if t is None else grid[best(t)] for t in rec.clip_fit]
                filled = [b for b in range(nb) if full[b] is not None]
                if not filled:
                    raise ValueError(f"{expert} expert, {name}: no timestep bin received rows")
                rec.clip, rec.clip_source = [], []
                for b in range(nb):
                    if full[b] is not None:
                        rec.clip.append(full[b])
                        rec.clip_source.append("searched")
                    else:
                        j = min(filled, key=lambda f: (abs(f - b), f))
                        rec.clip.append(full[j])
                        rec.clip_source.append(f"bin {j}")
                        notes.setdefault(expert, {})[b] = j
            else:
                if policy == "global":
                    tables = [r.clip_fit for e in records.values() for n, r in e.items() if n == name]
                    table = pooled([t for ts in tables for t in ts])
                else:
                    table = pooled(rec.clip_fit)
                if table is None:
                    raise ValueError(f"{expert} expert, {name}: no timestep bin received rows")
                rec.clip = [grid[best(table)]] * nb
                rec.clip_source = [policy] * nb
    for expert, fallbacks in notes.items():
        for b, j in sorted(fallbacks.items()):
            log.warning("%s expert: timestep bin %d received no samples; its layers use the clip ratio "
                        "of bin %d (more steps or items fill it)", expert, b, j)
    return notes


def build_report(config, records: dict[str, dict[str, LayerRecord]], experts_info: dict, paths: dict) -> dict:
    """The JSON document: config, per-expert info (bins, edges, timesteps seen), per-layer records, totals."""
    out = {"config": config.to_dict(), "states": {k: str(v) for k, v in paths.items()},
           "resources": experts_info.get("resources", {}), "experts": {}}
    for expert, layers in records.items():
        recs = [r.to_json() for r in layers.values()]
        ref = sum(sum(r.ref_eval) for r in layers.values())
        plain = sum(sum(r.plain_eval) for r in layers.values())
        full = sum(sum(t[r._grid_index(b)] for b, t in enumerate(r.clip_eval) if t is not None)
                   for r in layers.values())
        out["experts"][expert] = {**experts_info.get(expert, {}), "layers": recs,
                                  "sqnr_rtn_db_pooled": _finite(sqnr_from_sums(ref, plain)),
                                  "sqnr_after_db_pooled": _finite(sqnr_from_sums(ref, full))}
    return out


def write_json(path, data: dict, overwrite: bool = False) -> Path:
    """Atomic write (temp file in the same folder + rename); refuses to replace without ``overwrite``."""
    path = Path(path)
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"  # before anything is written: NaN fails here
    fmt.write_bytes(path, text.encode(), overwrite=overwrite)
    return path


def table(records: dict[str, dict[str, LayerRecord]], max_rows: int = 24) -> str:
    """A short text table: one line per layer (the worst ``max_rows`` by SQNR after, if more)."""
    rows = []
    for expert, layers in records.items():
        for r in layers.values():
            before, after = r.sqnr()
            rows.append((expert, r.name, r.alpha, r.rank, r.residual, r.err_rtn, r.err_gptq, r.clip, before, after))
    shown = rows if len(rows) <= max_rows else sorted(rows, key=lambda x: x[-1])[:max_rows]
    head = f"{'expert':6} {'layer':28} {'alpha':>5} {'rank':>4} {'resid':>5} {'rtn err':>8} {'gptq err':>8}  " \
           f"{'clip per bin':24} {'SQNR rtn':>8} {'-> full':>8}"
    lines = [head, "-" * len(head)]
    for e, n, a, k, res, er, eg, c, b, f in shown:
        clips = ",".join(f"{x:.2f}" for x in c)
        eg_s = "-" if eg is None else f"{eg:.2e}"
        lines.append(f"{e:6} {n:28} {a:5.2f} {k:4d} {res:>5} {er:8.2e} {eg_s:>8}  {clips:24} {b:8.2f} {f:8.2f}")
    if len(rows) > max_rows:
        lines.append(f"({len(rows) - max_rows} more layers in the JSON report; shown: the {max_rows} worst)")
    return "\n".join(lines)
