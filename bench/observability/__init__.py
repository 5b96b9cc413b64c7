"""The pieces of `bench_observability.py`: the traced workloads on each library, the
OpenTelemetry SDK setup they share, and the stats/scrape measurements."""
