import json
import subprocess

from pangu_moe.bench import data


def test_bench_prepares_and_reads_two_corpus_sizes_in_worker_processes():
    result = data.run(sizes_mb=(0.2, 0.6), read_steps=3, log=lambda line: None, train_tokens_per_s=1000.0)
    small, large = result["sizes"][0.2], result["sizes"][0.6]
    assert 0.2 <= small["corpus_mb"] < 0.21 and 0.6 <= large["corpus_mb"] < 0.61
    assert all(f["prepare_seconds"] > 0 and f["read_seconds"] > 0 for f in (small, large))
    assert 50 < small["peak_rss_mb"] < 4000  # a worker process with MindSpore imported
    assert "rss_growth_mb = " in data.table(result)


def test_bench_figures_from_the_workers_measurements(monkeypatch):
    """Stand-in workers report: 0.2 MB prepared in 2 s and 3 batches read in 0.5 s at 300 MB peak; 0.6 MB in 4 s,
    read in 0.25 s, 310 MB. The largest corpus gives the rates: 0.6 / 4 MB/s, 3 x 16 x 256 / 0.25 tokens/s."""
    measured = {"c0.2.jsonl": {"prepare_seconds": 2.0, "read_seconds": 0.5, "peak_rss_mb": 300.0},
                "c0.6.jsonl": {"prepare_seconds": 4.0, "read_seconds": 0.25, "peak_rss_mb": 310.0}}

    def worker(argv, **kwargs):
        name = argv[3].rsplit("/", 1)[-1]
        return subprocess.CompletedProcess(argv, 0, stdout="a log line\n" + json.dumps(measured[name]), stderr="")
    monkeypatch.setattr(data.subprocess, "run", worker)
    monkeypatch.setattr(data, "synthetic_jsonl", lambda path, mb: int(mb * 1e6))
    monkeypatch.setattr(data.os, "remove", lambda path: None)
    result = data.run(sizes_mb=(0.2, 0.6), read_steps=3, log=lambda line: None, train_tokens_per_s=1000.0)
    assert result["prepare_mb_per_s"] == 0.15 and result["read_tokens_per_s"] == 49152.0
    assert result["read_over_train"] == 49.152 and result["peak_rss_mb"] == 310.0 and result["rss_growth_mb"] == 10.0
    assert result["sizes"][0.2]["prepare_mb_per_s"] == 0.1 and result["sizes"][0.2]["read_tokens_per_s"] == 24576.0
