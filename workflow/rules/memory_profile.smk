# Page "Memory Profiling Analysis": one job per method (a single run each),
# then table and page.

if "memory_profile" in config["experiments"]:

    rule memory_profile_run:
        output:
            f"{RESULTS}/curves/memory_profile/{{curve}}.json",
        log:
            f"{RESULTS}/logs/memory_profile/{{curve}}.log",
        params:
            curve=curve_json("memory_profile"),
            records=f"{RESULTS}/runs/memory_profile",
        threads: run_threads()
        resources:
            mem_mb=lambda wc: config["run"]["memory_budget_mb"] + 4096,
            runtime=lambda wc: int(config["run"]["timeout_s"] / 60) + 5,
            gpu=run_gpus(),
        shell:
            "{PY} -m privbench sweep --curve-json {params.curve:q} --records-dir {params.records}"
            " --output {output} > {log} 2>&1"

    rule memory_profile_table:
        input:
            curve_summaries("memory_profile"),
        output:
            f"{RESULTS}/tables/memory_profile.csv",
        log:
            f"{RESULTS}/logs/memory_profile/table.log",
        shell:
            "{PY} -m privbench aggregate --output {output} {input} > {log} 2>&1"

    rule memory_profile_page:
        input:
            table=f"{RESULTS}/tables/memory_profile.csv",
        output:
            page_outputs("memory_profile"),
        log:
            f"{RESULTS}/logs/memory_profile/page.log",
        params:
            config=CONFIG_JSON,
        shell:
            "{PY} -m privbench report memory_profile --config-json {params.config:q} --table {input.table}"
            " > {log} 2>&1"

    localrules: memory_profile_table, memory_profile_page
