"""Benchmark the compiled ops against the libraries they replace (``minissl.ops.benchmark``).

    python benchmarks/bench_ops.py                  # all rows, 2 threads
    python benchmarks/bench_ops.py --only mix --repeats 9
"""
from minissl.ops.benchmark import main

if __name__ == "__main__":
    main()
