"""The GPU bench without a GPU: its arguments, its clear refusal without CUDA, and the JSON of its
CPU smoke run (--dry-run) with the tiny encoder."""

from __future__ import annotations

import pytest

from bench import gpu_bench
from tests.unit.bench.benchutil import run_json


def test_arguments_and_dry_run_sizes() -> None:
    args = gpu_bench.build_parser().parse_args(["--json", "--encoder", "runs/models/x"])
    assert args.encoder == "runs/models/x" and args.precisions == ["fp32", "fp16", "bf16"]
    gpu_bench._settle(args)
    assert (args.n, args.dim, args.batch_sizes, args.query_batch) == (1_000_000, 256, [32, 64, 128, 256, 512], 32)
    args = gpu_bench.build_parser().parse_args(["--dry-run", "--n", "500", "--precisions", "bf16"])
    gpu_bench._settle(args)
    assert args.n == 500 and args.dim == gpu_bench.DRY["dim"] and args.precisions == ["bf16"]
    assert gpu_bench.build_parser().parse_args([]).encoder == "default"
    for bad in (["--precisions", "fp8"], ["--precisions", ""], ["--batch-sizes", "0"]):
        with pytest.raises(SystemExit):
            gpu_bench.build_parser().parse_args(bad)


def test_without_cuda_it_refuses_clearly(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--json", "--encoder", "tiny"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "CUDA is not available" in captured.err and "--dry-run" in captured.err


def test_dry_run_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMESTYLE_ALLOW_RANDOM_WEIGHTS", "1")
    r = run_json(capsys, gpu_bench.main, [
        "--dry-run", "--json", "--encoder", "tiny", "--batch-sizes", "2,3", "--precisions", "fp32,bf16",
        "--listings", "3", "--rounds", "1", "--warmup", "0", "--n", "700", "--repeat", "1"])
    assert r["dry_run"] is True and r["device"] == "cpu" and r["encoder_version"].startswith("tiny")
    runs = r["encoder_runs"]
    assert [(x["batch_size"], x["precision"]) for x in runs] == [(2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]
    for x in runs:
        assert "error" in x or (x["listings_per_second"] > 0 and 0.9 < x["cosine_to_fp32_min"] <= 1.0001)
    assert r["best_encoder_run"] is not None and r["prepare_listings_per_second"] > 0
    search = r["search"]
    assert (search["n"], search["query_batch"], search["k"]) == (700, 32, 10)
    methods = search["methods"]
    assert methods["gpu_faiss_flat"]["skipped"]
    assert methods["cpu_flat_index"]["agreement_with_exact"] == 1.0
    assert methods["gpu_torch_fp32"]["agreement_with_exact"] == 1.0
    for name in ("cpu_flat_index", "cpu_faiss_knn", "gpu_torch_fp32", "gpu_torch_fp16"):
        assert methods[name]["seconds_per_batch"] > 0, name
