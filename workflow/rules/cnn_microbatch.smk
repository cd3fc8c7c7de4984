# Page "CNN Benchmark Results": one job per run (standard, clipped per microbatch
# size, the kit's fast_dp unless turned off) and one per JAXPR capture, then table and page.

from privbench import harness as privbench_harness

if "cnn_microbatch" in config["experiments"]:

    def cnn_microbatch_runtime_min(curve):
        """Every run of the curve at its time limit, plus slack for the harness."""
        runs = len(privbench_harness.batch_sizes(curve["batch_start"], curve["batch_cap"]))
        return int(runs * curve["limits"]["timeout_s"] / 60) + 5

    rule cnn_microbatch_curve:
        output:
            f"{RESULTS}/curves/cnn_microbatch/{{curve}}.json",
        log:
            f"{RESULTS}/logs/cnn_microbatch/{{curve}}.log",
        params:
            curve=curve_json("cnn_microbatch"),
            records=f"{RESULTS}/runs/cnn_microbatch",
        threads: run_threads()
        resources:
            mem_mb=lambda wc: config["run"]["memory_budget_mb"] + 4096,
            runtime=lambda wc: cnn_microbatch_runtime_min(curves_of("cnn_microbatch")[wc.curve]),
            gpu=run_gpus(),
        shell:
            "{PY} -m privbench sweep --curve-json {params.curve:q} --records-dir {params.records}"
            " --output {output} > {log} 2>&1"

    rule cnn_microbatch_table:
        input:
            curve_summaries("cnn_microbatch"),
        output:
            f"{RESULTS}/tables/cnn_microbatch.csv",
        log:
            f"{RESULTS}/logs/cnn_microbatch/table.log",
        shell:
            "{PY} -m privbench aggregate --output {output} {input} > {log} 2>&1"

    rule cnn_microbatch_page:
        input:
            table=f"{RESULTS}/tables/cnn_microbatch.csv",
        output:
            page_outputs("cnn_microbatch"),
        log:
            f"{RESULTS}/logs/cnn_microbatch/page.log",
        params:
            config=CONFIG_JSON,
        shell:
            "{PY} -m privbench report cnn_microbatch --config-json {params.config:q} --table {input.table}"
            " > {log} 2>&1"

    localrules: cnn_microbatch_table, cnn_microbatch_page
