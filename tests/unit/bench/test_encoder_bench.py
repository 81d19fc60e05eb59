"""The encoder bench on tiny data and a tiny fine-tuned model: every runtime timed and compared
with eager float32 on both evaluation sets, in one JSON object."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from PIL import Image

from bench import encoder_bench
from samestyle.models.backbones import TINY
from samestyle.models.finetuned import DualTower, TowerConfig, save_finetuned
from tests.unit.bench.benchutil import run_json

COLUMNS = ["listing_id", "title", "description", "price", "brand", "category", "image_path", "source"]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def tiny_data(root: Path) -> None:
    """Abt-Buy-shaped text listings (two sources) and Grocery-shaped photos against a catalogue."""
    names = ["red ceramic mug", "steel desk lamp", "oak chair", "usb-c cable 2m", "leather bag", "glass kettle"]
    abt = root / "abt_buy" / "full_gt"
    write_csv(abt / "listings.csv", COLUMNS,
              [[f"a{k}", name, "", "", "", "", "", "abt.com"] for k, name in enumerate(names)]
              + [[f"b{k}", name + " new", "", "", "", "", "", "buy.com"] for k, name in enumerate(names)])
    write_csv(abt / "clusters.csv", ["listing_id", "cluster_id"],
              [[f"{s}{k}", f"c{k}"] for k in range(len(names)) for s in "ab"])
    grocery = root / "grocery_store_images"
    (grocery / "images").mkdir(parents=True)
    rows, clusters = [], []
    for k, name in enumerate(names):
        for kind, shade in (("catalog", 0), ("val", 25)):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), (40 * k % 256, 200 - shade, 30 + shade)).save(buf, "PNG")
            (grocery / "images" / f"{kind}{k}.png").write_bytes(buf.getvalue())
            title = name if kind == "catalog" else ""
            rows.append([f"{kind}{k}", title, "", "", "", "", f"images/{kind}{k}.png", "grocery"])
            clusters.append([f"{kind}{k}", f"g{k}", f"gc{k}", kind])
    write_csv(grocery / "listings.csv", COLUMNS, rows)
    write_csv(grocery / "clusters.csv", ["listing_id", "cluster_id", "coarse_cluster_id", "split"], clusters)


def test_arguments() -> None:
    args = encoder_bench.build_parser().parse_args([])
    assert args.runtimes == ["eager", "channels-last", "int8", "bf16"] and args.batch_size == 32
    assert encoder_bench.build_parser().parse_args(["--runtimes", "bf16"]).runtimes == ["eager", "bf16"]
    with pytest.raises(SystemExit):
        encoder_bench.build_parser().parse_args(["--runtimes", "onnx"])


def test_json_on_tiny_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tiny_data(tmp_path / "data")
    towers = DualTower(TowerConfig(text_backbone=TINY, image_backbone=TINY, dim=32, image_size=32)).eval()
    model = save_finetuned(tmp_path / "model", towers, version="tiny-finetuned-v1", name="tiny")
    r = run_json(capsys, encoder_bench.main, [
        "--json", "--data", str(tmp_path / "data"), "--model", str(model), "--image-model", str(model),
        "--allow-random-weights", "--runtimes", "bf16,int8", "--n", "4", "--batch-size", "2", "--rounds", "2",
        "--warmup-batches", "1", "--plot", str(tmp_path / "encoder.png")])
    assert r["runtimes"] == ["eager", "bf16", "int8"] and set(r["sets"]) == {"abt_buy_full_gt", "grocery_val_photos"}
    for name, s in r["sets"].items():
        assert s["timed_listings"] == 4
        assert s["speed"]["eager"]["ratio_to_eager"] == 1.0
        for runtime in r["runtimes"]:
            speed = s["speed"][runtime]
            assert speed["listings_per_second"] > 0 and len(speed["runs_listings_per_second"]) == 2
            quality = s["quality"][runtime]
            assert set(quality["recall_at_10_delta"]) == set(quality["recall_at_10"]) and quality["recall_at_10"]
            assert 0.9 < quality["cosine_to_eager_min"] <= 1.0001
        assert s["quality"]["eager"]["max_abs_delta"] == 0.0
        assert s["fastest_holding"] in r["runtimes"]
    assert r["sets"]["grocery_val_photos"]["timed_with_images"] == 4
    assert "I->IT" in r["sets"]["grocery_val_photos"]["quality"]["eager"]["recall_at_10"]
    assert isinstance(r["goal_met"], bool) and (tmp_path / "encoder.png").stat().st_size > 0
