"""How much room hard preservation leaves on the toy world: for each ``energy`` of the protected span (RECE-NS's
``hard_preservation.energy``), what share of the kept prompts an edit may still move, and what share of the erased
colours' own signal lies out of reach of the protected inputs.

    python benchmarks/toy_reach.py --out docs/toy_reach            # a few seconds on 2 CPU cores
    python benchmarks/toy_reach.py --k 4 --out docs/toy_reach_k4   # red, blue, green and yellow erased

No image is made: it is linear algebra on the text encodings and G. Every hard-preserving edit keeps ``X y = y`` for
each input y in the protected span S, so the derived-embedding attack (Eq. 8, as reg -> 0) can always rebuild, from
inputs in S, the part of an erased colour's K/V output that S reproduces. An erased colour's *signal* is its prompts'
encodings (the bare word and "a <colour> <shape>" for every shape, all positions) minus the kept colours' mean
encoding of the same prompts; "out of reach" is the share of its K/V energy (``x^T G x``, summed over every K/V
matrix) that no input in S reproduces, the most of that signal any hard-preserving edit can keep from the attack.
The kept prompts are ``toy_beyond.py``'s ``shapes-and-words`` set (the kept colours on every shape and as the bare
word); "may move" is the share of their encodings' energy outside S (their token rows, the span RECE-NS protects with
``rows: tokens``, and all positions).
"""

from __future__ import annotations

import sys

import torch
import toy_common as common
from toy_beyond import ORDER, preserved

from rece_lightning.closed_form import null_space_basis
from rece_lightning.toyworld import COLOURS, SHAPES

ENERGIES = (0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)


def templates() -> list[str]:
    return ["{c}", *(f"a {{c}} {shape}" for shape in SHAPES)]


def protected_span(free: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the complement of ``free`` (d x m): the directions no hard-preserving edit moves."""
    dim = free.shape[0]
    projector = torch.eye(dim, dtype=free.dtype) - free @ free.T
    basis, _, _ = torch.linalg.svd(projector)
    return basis[:, : dim - free.shape[1]]


def out_of_reach(signal: torch.Tensor, span: torch.Tensor, gram: torch.Tensor) -> float:
    """Share of ``signal``'s K/V energy (rows x: ``x^T G x``) that no input in ``span`` reproduces: the G-weighted
    least-squares residual of every row on ``span``, over the rows' own energy."""
    total = float(torch.einsum("ni,ij,nj->", signal, gram, signal))
    if span.shape[1] == 0:
        return 1.0
    coefficients = torch.linalg.solve(span.T @ gram @ span, span.T @ gram @ signal.T)
    residual = signal - (span @ coefficients).T
    return float(torch.einsum("ni,ij,nj->", residual, gram, residual)) / total


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_reach")
    parser.add_argument("--k", type=int, default=1, help=f"colours erased: the first k of {', '.join(ORDER)}")
    parser.add_argument("--energies", type=float, nargs="+", default=list(ENERGIES), help="protected energy shares")
    args = common.parse(parser, argv, positive=("k",))
    if args.k > len(ORDER) - 1:
        parser.error(f"--k={args.k} is not allowed: at most {len(ORDER) - 1} colours can be erased (one must be kept)")
    for energy in args.energies:
        if not 0 < energy <= 1:
            parser.error(f"--energies: {energy} is not allowed: each must be in (0, 1]")
    erased = list(ORDER[: args.k])
    kept = [c for c in COLOURS if c not in erased]
    lab = common.Lab(args.model)
    module = lab.module(erased)
    gram = module.gram.to(torch.float64)
    kept_encoded = module.encoded(preserved("shapes-and-words", erased))
    token_rows = torch.cat([e.embedding[: e.length].to(torch.float64) for e in kept_encoded])
    all_rows = torch.cat([e.embedding.to(torch.float64) for e in kept_encoded])

    def stacked(colour: str) -> torch.Tensor:
        encoded = module.encoded([t.format(c=colour) for t in templates()])
        return torch.cat([e.embedding.to(torch.float64) for e in encoded])

    kept_mean = torch.stack([stacked(c) for c in kept]).mean(0)
    signals = {c: stacked(c) - kept_mean for c in erased}

    rows = []
    for energy in args.energies:
        free = null_space_basis([token_rows], energy=energy)
        span = protected_span(free)

        def outside(matrix: torch.Tensor) -> float:
            return float((matrix @ free).norm() ** 2 / matrix.norm() ** 2)

        rows.append(
            {
                "energy": energy,
                "protected_dims": int(span.shape[1]),
                "dims": int(free.shape[0]),
                "kept_may_move_token_rows": outside(token_rows),
                "kept_may_move_all_rows": outside(all_rows),
                "erased_signal_out_of_reach": {c: out_of_reach(s, span, gram) for c, s in signals.items()},
            }
        )
        print(f"energy {energy}: {rows[-1]['protected_dims']} dims protected", file=sys.stderr, flush=True)
    report = {"model": args.model, "erased": erased, "kept": kept, "templates": templates(), "rows": rows}
    header = [
        "energy",
        "protected dims (of d)",
        "kept prompts an edit may move: token rows / all rows",
        *(f"{c}'s signal out of reach" for c in erased),
    ]
    table_rows = [
        [
            f"{r['energy']:g}",
            f"{r['protected_dims']} (of {r['dims']})",
            f"{100 * r['kept_may_move_token_rows']:.1f} % / {100 * r['kept_may_move_all_rows']:.1f} %",
            *(f"{100 * r['erased_signal_out_of_reach'][c]:.1f} %" for c in erased),
        ]
        for r in rows
    ]
    common.write(args.out, report, common.markdown_table(header, table_rows))


if __name__ == "__main__":
    main()
