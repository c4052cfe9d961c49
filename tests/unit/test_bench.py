from vllm_obtain.bench import BenchResult, format_table, percentile, ratios


def result(url: str, tok_s: float, ttft: float) -> BenchResult:
    return BenchResult(url, 16, 32, 0, 10.0, int(tok_s * 10), tok_s, 3.2, ttft, ttft, 5.0, 9.0)


def test_percentiles_pick_from_the_sorted_values():
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile([5, 1, 3, 2, 4], 99) == 5
    assert percentile([], 50) is None


def test_ratios_favour_the_first_url_above_one():
    r = ratios(result("a", 400, 50), result("b", 100, 200))
    assert r["output_tokens_per_s"] == 4.0
    assert r["ttft_p50_speedup"] == 4.0


def test_table_has_a_row_per_result():
    table = format_table([result("a", 1, 1), result("b", 2, 2)])
    assert len(table.splitlines()) == 3
    assert "tok/s" in table.splitlines()[0]


def test_plot_draws_one_png_from_the_results_of_several_servers(tmp_path):
    from dataclasses import asdict

    from vllm_obtain.bench import plot

    rows = []
    for name, scale in (("ours", 1.0), ("llama-server", 0.9)):
        for level in (1, 16, 64):
            row = asdict(result(name, 50 * level * scale, 100.0 * level))
            rows.append({**row, "concurrency": level, "name": name})
    out = tmp_path / "speed.png"
    plot(rows, str(out), title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000  # two panels with lines, not an empty canvas
