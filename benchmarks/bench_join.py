"""Join benchmark: an embeddings output file -> per-input vectors, pipeline vs per-line baseline.

Data (built once and cached under `benchmarks/.data/join-...`): `--inputs` unit ids packed into
requests of `--per-request` inputs, their `hash_embeddings` vectors (float32, `--dims`), and two
output files with the same requests in the same shuffled line order, shaped like the Batch API's
(and the local server's) output lines:

- `base64.jsonl`: `encoding_format: base64` bodies (what the pipeline requests), via `base64_rows`;
- `float.jsonl`: `encoding_format: float` bodies (JSON number lists), via `float_json_rows`.

Variants (each in its own process):

- `pipeline`: the real join on the base64 file, as `EmbeddingsJob.parse_attempt` runs it:
  `read_embedding_lines` (msgspec, `embedding` kept as raw views) -> `dedupe` ->
  `embedding_outcomes` (base64 decoded in blocks by pybase64 into one float32 matrix).
- `baseline`: the float file, `json.loads` per line, one `numpy.asarray(list_of_floats)` per
  input, stacked into a matrix.
- `json-base64`: the base64 file parsed the baseline's way (`json.loads` per line,
  `base64.b64decode` + `numpy.frombuffer` per input): the plain per-input loop to beat.
- `polars-reference`: the previous pipeline join (`join_reference.py`: Polars NDJSON of the whole
  nested struct, `str.decode("base64")`, string-key joins, `bin.reinterpret`).
- `msgspec-bytes` (extra, for attribution): a typed msgspec decoder whose `embedding: bytes`
  field decodes base64 itself (one bytes object per input), joined into a matrix.
- `orjson-base64` (extra): `json-base64` with `orjson.loads` instead of `json.loads`.

Each variant runs `--repeat` times (default 5), round-robin over the variants, and the run with
the median time is reported (all totals are kept in the JSON as `seconds_all`): the 2-core
machine is shared, and a single run can be off by 2x.

Checks: every run returns every unit id once, and its vectors equal the generated ones
(`numpy.allclose`; in practice bit-identical, as 9 significant digits round-trip float32).

Usage:
    python benchmarks/bench_join.py --inputs 200000 --dims 256 [--per-request 1000] [--seed 0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import orjson
import polars as pl

import join_reference
from batchyard.localapi.shapes import output_line
from batchyard.localapi.vectors import base64_rows, float_json_rows, hash_embeddings
from batchyard.stages.join import dedupe, embedding_outcomes, read_embedding_lines
from data import DATA_DIR
from harness import (
    Stopwatch,
    comparison_table,
    console,
    emit,
    run_worker,
    stages_table,
    worker_result,
    write_result,
)

MODEL = "text-embedding-3-small"
FILES = {
    "pipeline": "base64.jsonl",
    "baseline": "float.jsonl",
    "json-base64": "base64.jsonl",
    "polars-reference": "base64.jsonl",
    "msgspec-bytes": "base64.jsonl",
    "orjson-base64": "base64.jsonl",
}
# what each comparison row measures the pipeline against
VERSUS = {
    "baseline": "join",
    "json-base64": "join (vs json.loads + base64 per input)",
    "polars-reference": "join (vs the previous Polars join)",
    "msgspec-bytes": "join (extra: msgspec decodes base64 per input)",
    "orjson-base64": "join (extra: orjson.loads + base64 per input)",
}


# data


def join_dir(n_inputs: int, dims: int, per_request: int, seed: int) -> Path:
    return DATA_DIR / f"join-{n_inputs}-d{dims}-r{per_request}-s{seed}"


def ensure_join_data(n_inputs: int, dims: int, per_request: int, seed: int) -> Path:
    """Build (once) requests.parquet, truth.npy and the two output files."""
    final = join_dir(n_inputs, dims, per_request, seed)
    if final.exists():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unit_ids = [f"co-{i // 5000:04d}/doc-{i // 50:06d}/{i % 50:05d}" for i in range(n_inputs)]
    truth = hash_embeddings(unit_ids, dims)
    np.save(tmp / "truth.npy", truth)
    groups = [
        list(range(s, min(s + per_request, n_inputs))) for s in range(0, n_inputs, per_request)
    ]
    custom_ids = [
        "emb-" + hashlib.sha256(f"{MODEL}|{dims}|{seed}|{g[0]}".encode()).hexdigest()[:40]
        for g in groups
    ]
    pl.DataFrame(
        {"custom_id": custom_ids, "unit_ids": [[unit_ids[i] for i in g] for g in groups]},
        schema={"custom_id": pl.String, "unit_ids": pl.List(pl.String)},
    ).write_parquet(tmp / "requests.parquet")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)  # batch output lines come in any order
    for name, rows in (
        ("base64.jsonl", ['"' + s + '"' for s in base64_rows(truth)]),
        ("float.jsonl", float_json_rows(truth)),
    ):
        with (tmp / name).open("w", encoding="utf-8") as f:
            for k in order:
                f.write(output_line(custom_ids[k], 200, _body(groups[k], rows)) + "\n")
        del rows
    tmp.rename(final)
    return final


def _body(group: list[int], rows: list[str]) -> str:
    """A `/v1/embeddings` response body, built as text like the local server does."""
    data = ",".join(
        '{"object":"embedding","index":' + str(i) + ',"embedding":' + rows[u] + "}"
        for i, u in enumerate(group)
    )
    tokens = 180 * len(group)
    return (
        '{"object":"list","data":['
        + data
        + '],"model":"'
        + MODEL
        + '","usage":{"prompt_tokens":'
        + str(tokens)
        + ',"total_tokens":'
        + str(tokens)
        + "}}"
    )


# workers (each runs in its own process)


def run_pipeline(src: Path, dims: int, out: Path, variant: str) -> dict[str, Any]:
    """The join as `parse_attempt` runs it; `polars-reference` swaps in the previous read/outcomes."""
    impl = join_reference if variant == "polars-reference" else None
    read = impl.read_embedding_lines if impl else read_embedding_lines
    outcomes_of = impl.embedding_outcomes if impl else embedding_outcomes
    sw = Stopwatch()
    with sw.stage("read file + plan"):
        output = (src / FILES[variant]).read_bytes()
        requests = pl.read_parquet(src / "requests.parquet")
    with sw.stage("read_embedding_lines"):
        out_lines, a1 = read(output, "outputs/bench.jsonl")
        err_lines, a2 = read(b"", "errors/bench.jsonl")
    with sw.stage("dedupe"):
        lines, a3 = dedupe(pl.concat([out_lines, err_lines]), requests["custom_id"], "shard bench")
    with sw.stage("embedding_outcomes (decode)"):
        vectors, outcomes = outcomes_of(requests, lines, dims=dims, batch_ended_as="completed")
    ok = int((outcomes["outcome"] == "ok").sum())
    result = worker_result(
        sw, vectors.height, requests_ok=ok, anomalies=a1.height + a2.height + a3.height
    )
    _save(out, vectors["unit_id"].to_list(), vectors["vector"].to_numpy())
    return result


class _Item(msgspec.Struct):
    index: int
    embedding: bytes  # msgspec decodes the base64 string into bytes


class _Body(msgspec.Struct):
    data: list[_Item] = []


class _Response(msgspec.Struct):
    status_code: int
    body: _Body | None = None


class _Line(msgspec.Struct):
    custom_id: str
    response: _Response | None = None


def run_msgspec_bytes(src: Path, dims: int, out: Path) -> dict[str, Any]:
    """msgspec's own base64 decoding: one `bytes` per input, joined into a matrix."""
    sw = Stopwatch()
    with sw.stage("read file + plan"):
        output = (src / FILES["msgspec-bytes"]).read_bytes()
        requests = pl.read_parquet(src / "requests.parquet")
        plan = dict(
            zip(requests["custom_id"].to_list(), requests["unit_ids"].to_list(), strict=True)
        )
    with sw.stage("msgspec decode (base64 -> bytes per input)"):
        lines = msgspec.json.Decoder(_Line).decode_lines(output)
    with sw.stage("map to units + join bytes"):
        seen: set[str] = set()
        ids: list[str] = []
        chunks: list[bytes] = []
        ok = anomalies = 0
        for line in lines:
            cid = line.custom_id
            if cid not in plan or cid in seen:
                anomalies += 1
                continue
            seen.add(cid)
            resp = line.response
            if resp is None or resp.status_code != 200 or resp.body is None:
                continue
            units = plan[cid]
            got = [(units[it.index], it.embedding) for it in resp.body.data]
            if len(got) == len(units) and all(len(b) == dims * 4 for _, b in got):
                ok += 1
                ids.extend(u for u, _ in got)
                chunks.extend(b for _, b in got)
        matrix = np.frombuffer(b"".join(chunks), "<f4").reshape(-1, dims)
    result = worker_result(sw, len(ids), requests_ok=ok, anomalies=anomalies)
    _save(out, ids, matrix)
    return result


def run_json(src: Path, dims: int, out: Path, variant: str) -> dict[str, Any]:
    """The per-line way: `json.loads`, then one numpy array per input (float lists or base64)."""
    encoding = "float" if variant == "baseline" else "base64"
    loads = orjson.loads if variant == "orjson-base64" else json.loads
    sw = Stopwatch()
    with sw.stage("read file + plan"):
        output = (src / FILES[variant]).read_bytes()
        requests = pl.read_parquet(src / "requests.parquet")
        plan = dict(
            zip(requests["custom_id"].to_list(), requests["unit_ids"].to_list(), strict=True)
        )
    with sw.stage(
        f"{'orjson' if loads is orjson.loads else 'json'}.loads + numpy per input ({encoding})"
    ):
        seen: set[str] = set()
        ids: list[str] = []
        vecs: list[np.ndarray] = []
        ok = anomalies = 0
        for raw in output.splitlines():
            if not raw.strip():
                continue
            line = loads(raw)
            cid = line.get("custom_id")
            if cid not in plan or cid in seen:
                anomalies += 1
                continue
            seen.add(cid)
            resp = line.get("response") or {}
            if resp.get("status_code") != 200:
                continue
            units = plan[cid]
            got = []
            for item in resp["body"]["data"]:
                emb = item["embedding"]
                vec = (
                    np.asarray(emb, dtype=np.float32)
                    if encoding == "float"
                    else np.frombuffer(base64.b64decode(emb), dtype="<f4")
                )
                got.append((units[item["index"]], vec))
            if len(got) == len(units) and all(v.shape == (dims,) for _, v in got):
                ok += 1
                for uid, vec in got:
                    ids.append(uid)
                    vecs.append(vec)
        matrix = np.stack(vecs) if vecs else np.empty((0, dims), np.float32)
    result = worker_result(sw, len(ids), requests_ok=ok, anomalies=anomalies)
    _save(out, ids, matrix)
    return result


def _save(out: Path, ids: list[str], matrix: np.ndarray) -> None:
    pl.DataFrame({"unit_id": ids}).write_parquet(out / "ids.parquet")
    np.save(out / "vectors.npy", matrix)


# driver


def measure(variant: str, src: Path, dims: int) -> tuple[dict[str, Any], np.ndarray]:
    """Run one variant in a fresh process; its result and its vectors in unit-id order."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-join-{variant}-"))
    try:
        res = run_worker(
            Path(__file__),
            ["--worker", variant, "--src", str(src), "--dims", str(dims), "--out", str(out)],
        )
        ids = pl.read_parquet(out / "ids.parquet")["unit_id"]
        vectors = np.load(out / "vectors.npy")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert ids.n_unique() == ids.len(), f"{variant}: a unit id appears twice"
    return res, vectors[ids.arg_sort().to_numpy()]


def bench(n_inputs: int, dims: int, per_request: int, seed: int, repeat: int = 5) -> dict[str, Any]:
    """Run every variant `repeat` times, round-robin, and keep each variant's median run."""
    src = ensure_join_data(n_inputs, dims, per_request, seed)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    truth = np.load(src / "truth.npy")  # rows in unit-id order: the ids sort like their index
    sizes = {name: (src / name).stat().st_size for name in ("base64.jsonl", "float.jsonl")}
    console.print(
        f"[bold]join[/]: {n_inputs:,} inputs x {dims} dims in requests of {per_request}; "
        f"base64 file {sizes['base64.jsonl'] / 2**20:,.0f} MiB, float file {sizes['float.jsonl'] / 2**20:,.0f} MiB; "
        f"{repeat} run(s) per variant"
    )
    attempts: dict[str, list[dict[str, Any]]] = {variant: [] for variant in FILES}
    exact = True
    for _ in range(repeat):  # round-robin, so a busy spell on the machine hits every variant
        for variant in FILES:
            res, vectors = measure(variant, src, dims)
            assert res["rows"] == n_inputs, f"{variant}: {res['rows']} vectors, expected {n_inputs}"
            assert np.allclose(vectors, truth, rtol=0, atol=1e-7), (
                f"{variant}: vectors differ from the generated ones"
            )
            exact = exact and np.array_equal(vectors, truth)
            attempts[variant].append(res)
    runs = {variant: median_run(results) for variant, results in attempts.items()}
    console.print(
        f"[green]check ok[/]: every run of every variant returns the {n_inputs:,} generated vectors "
        f"(bit-identical: {exact})"
    )
    rows = [
        {"stage": stage, "rows": n_inputs, "pipeline": runs["pipeline"], "baseline": runs[other]}
        for other, stage in VERSUS.items()
    ]
    return {
        "rows": rows,
        "runs": runs,
        "file_bytes": sizes,
        "bit_identical": exact,
        "load_at_start": load_at_start,
        "params": {
            "inputs": n_inputs,
            "dims": dims,
            "per_request": per_request,
            "seed": seed,
            "repeat": repeat,
        },
    }


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median total time, with every run's total beside it."""
    ranked = sorted(results, key=lambda r: r["seconds"])
    return {**ranked[len(ranked) // 2], "seconds_all": [r["seconds"] for r in results]}


def report(result: dict[str, Any]) -> None:
    console.print(stages_table("join: stages (peak RSS so far after each)", result["runs"]))
    console.print(
        comparison_table(
            "join: pipeline (base64, msgspec + block decode) vs each other variant", result["rows"]
        )
    )
    b, f = result["file_bytes"]["base64.jsonl"], result["file_bytes"]["float.jsonl"]
    console.print(
        f"output file size: base64 {b / 2**20:,.1f} MiB, float {f / 2**20:,.1f} MiB ({f / b:.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--inputs", type=int, default=200_000)
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--per-request", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5, help="runs per variant (the median is kept)")
    ap.add_argument("--worker", choices=list(FILES), help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker in ("pipeline", "polars-reference"):
        emit(run_pipeline(args.src, args.dims, args.out, args.worker))
    elif args.worker == "msgspec-bytes":
        emit(run_msgspec_bytes(args.src, args.dims, args.out))
    elif args.worker:
        emit(run_json(args.src, args.dims, args.out, args.worker))
    else:
        result = bench(args.inputs, args.dims, args.per_request, args.seed, args.repeat)
        report(result)
        console.print(f"results: {write_result('join', result)}")


if __name__ == "__main__":
    main()
