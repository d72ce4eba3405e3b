"""What a variant costs (`surgery bench`):

    count.py     parameters and bytes as a written checkpoint holds them, and the FLOP shape
    flops.py     matmul FLOPs per token for prompt processing and generation (torch-free)
    timing.py    one measurement of a loaded model: pp, ttft, tg, peak memory (CPU or CUDA)
    worker.py    one row in a fresh process: load, apply the plan, free what it drops, measure
    run.py       the plans resolved, the workers driven with repeats interleaved, accuracy
    bench_rows.py bench.json's rows: medians, IQRs, predicted and measured speed-ups (torch-free)
    pareto.py    the front of speed against accuracy (torch-free)
    plot.py      the PNG
    settings.py  the command's options, checked before anything loads
"""
