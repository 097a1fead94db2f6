"""Paper budget for a bigger catalogue: index memory per faiss factory string (faiss contrib get_code_size).

    python benchmarks/similar_capacity.py --n 100000000 --dim 256

Bytes per vector come from faiss itself (`faiss.contrib.factory_tools.get_code_size`), plus 8 bytes
per stored id (IVF lists keep int64 ids) and the coarse centroids. Nothing is built; this is the
arithmetic behind the 100 M extrapolation in the similar-items notes.
"""
from __future__ import annotations

import argparse
import math


def budget(n: int, dim: int, factory: str) -> dict:
    from faiss.contrib.factory_tools import get_code_size

    code = get_code_size(dim, factory)
    nlist = 0
    for part in factory.split(","):
        if part.startswith("IVF"):
            nlist = int(part[3:].split("_")[0])
    ids = 8 if nlist else 0
    centroids = nlist * dim * 4
    total = n * (code + ids) + centroids
    return {"factory": factory, "code_bytes": code, "total_gib": total / 2**30,
            "per_list": n / nlist if nlist else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000_000, help="vectors (default: 100,000,000)")
    ap.add_argument("--dim", type=int, default=256, help="dimension (default: 256)")
    args = ap.parse_args()
    nlist = 2 ** round(math.log2(4 * math.sqrt(args.n)))
    factories = ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},SQ8", f"IVF{nlist},PQ64", f"IVF{nlist},PQ32",
                 "HNSW32,Flat"]
    print(f"{args.n:,} × {args.dim}-d")
    print(f"{'factory':<24}{'bytes/vector':>14}{'index GiB':>12}{'vectors/list':>14}")
    for f in factories:
        b = budget(args.n, args.dim, f)
        per_list = f"{b['per_list']:,.0f}" if b["per_list"] else "-"
        print(f"{f:<24}{b['code_bytes']:>14}{b['total_gib']:>12.1f}{per_list:>14}")


if __name__ == "__main__":
    main()
