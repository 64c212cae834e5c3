"""The demo pipeline (make demo) on a subsample: every stage runs as a real script and the table's figures hold."""

import json

import pytest

import demo


@pytest.mark.slow
def test_demo_pipeline_on_a_subsample(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--n_cells", "160", "--pretrain_epochs", "1", "--finetune_epochs", "2", "--gene2vec_epochs", "1"]
    results = demo.main(["--out_dir", str(out), *args])
    printed = capsys.readouterr().out
    # Every stage ran and is timed; the table names both methods.
    for stage in ("data", "preprocess", "gene2vec", "pretrain", "finetune", "predict", "baseline"):
        assert results["timings_s"][stage] > 0, stage
    assert "scBERT" in printed and "L1 logistic regression" in printed
    assert "scGPT-style transformer" in printed  # the second family's row, on the same query cells
    for stage in ("preprocess_scgpt", "pretrain_scgpt", "finetune_scgpt", "predict_scgpt"):
        assert results["timings_s"][stage] > 0, stage
    assert 0.0 <= results["scGPT-style transformer"]["accuracy"] <= 1.0
    # The figures are well-formed fractions, and the saved JSON is what was printed.
    for method in ("scBERT", "L1 logistic regression"):
        for key in ("accuracy", "macro_f1"):
            assert 0.0 <= results[method][key] <= 1.0
    assert 0.0 <= results["scBERT"]["novel_recall"] <= 1.0
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["scBERT"] == pytest.approx(results["scBERT"])
    # The baseline is a real classifier: on PBMC sorted populations it beats chance (10 types) by far.
    assert results["L1 logistic regression"]["accuracy"] > 0.5
    # Outputs a user keeps are where the demo says.
    assert (out / "query_predictions.h5ad").exists() and (out / "query_predictions.csv").exists()
    assert (out / "ckpts" / "demo_finetune_best.pth").exists()
    for picture in ("umap", "dotplot", "confidence"):  # the pictures the README shows
        assert (out / f"query_predictions_{picture}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert list((out / "ckpts").glob("*confusion*.png"))
    # Running it again in the same folder works (the training scripts would refuse to start fresh over the first
    # run's checkpoints) and, being deterministic, gives the same figures.
    again = demo.main(["--out_dir", str(out), *args, "--transformer", "False"])  # scBERT's rows alone, faster
    assert again["scBERT"] == pytest.approx(results["scBERT"])
