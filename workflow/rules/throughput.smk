# Page "Benchmark Results": one job per batch-size curve, then table and page.

if "throughput" in config["experiments"]:

    rule throughput_curve:
        output:
            f"{RESULTS}/curves/throughput/{{curve}}.json",
        log:
            f"{RESULTS}/logs/throughput/{{curve}}.log",
        params:
            curve=curve_json("throughput"),
            records=f"{RESULTS}/runs/throughput",
        threads: run_threads()
        resources:
            mem_mb=lambda wc: config["run"]["memory_budget_mb"] + 4096,
            runtime=lambda wc: int(config["run"]["timeout_s"] * 8 / 60) + 5,
            gpu=run_gpus(),
        shell:
            "{PY} -m privbench sweep --curve-json {params.curve:q} --records-dir {params.records}"
            " --output {output} > {log} 2>&1"

    rule throughput_table:
        input:
            curve_summaries("throughput"),
        output:
            f"{RESULTS}/tables/throughput.csv",
        log:
            f"{RESULTS}/logs/throughput/table.log",
        shell:
            "{PY} -m privbench aggregate --output {output} {input} > {log} 2>&1"

    rule throughput_page:
        input:
            table=f"{RESULTS}/tables/throughput.csv",
        output:
            page_outputs("throughput"),
        log:
            f"{RESULTS}/logs/throughput/page.log",
        params:
            config=CONFIG_JSON,
        shell:
            "{PY} -m privbench report throughput --config-json {params.config:q} --table {input.table} > {log} 2>&1"

    localrules: throughput_table, throughput_page
