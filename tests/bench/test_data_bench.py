from pangu_moe.bench import data


def test_bench_reports_rates_and_memory_of_two_corpus_sizes():
    result = data.run(sizes_mb=(0.2, 0.6), read_steps=3, log=lambda line: None, train_tokens_per_s=1000.0)
    small, large = result["sizes"][0.2], result["sizes"][0.6]
    assert 0.2 <= small["corpus_mb"] < 0.21 and 0.6 <= large["corpus_mb"] < 0.61
    assert result["read_tokens_per_s"] == large["read_tokens_per_s"] == 3 * 16 * 256 / large["read_seconds"]
    assert result["read_over_train"] == result["read_tokens_per_s"] / 1000.0
    assert result["rss_growth_mb"] == large["peak_rss_mb"] - small["peak_rss_mb"]
    assert 50 < small["peak_rss_mb"] < 4000  # a worker process with MindSpore imported
    assert "rss_growth_mb = " in data.table(result)
