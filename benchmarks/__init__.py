"""Speed and memory benchmarks of postax (run as `python -m benchmarks.NAME`)."""
