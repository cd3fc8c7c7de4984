# Page "Torch benchmarks": one job per configuration (its batch-size curve, one
# process per run; a Flower run starts its own federation), then table and page.

from privbench.experiments import torch_cifar as privbench_torch_cifar

if "torch_cifar" in config["experiments"]:

    def torch_cifar_mem_mb(curve):
        # every party (the worker, or each Flower client) may use the budget
        return curve["num_clients"] * curve["limits"]["memory_budget_mb"] + 4096

    rule torch_cifar_curve:
        input:
            privbench_torch_cifar.data_files(config),
        output:
            f"{RESULTS}/curves/torch_cifar/{{curve}}.json",
        log:
            f"{RESULTS}/logs/torch_cifar/{{curve}}.log",
        params:
            curve=curve_json("torch_cifar"),
            records=f"{RESULTS}/runs/torch_cifar",
        threads: run_threads()
        resources:
            mem_mb=lambda wc: torch_cifar_mem_mb(curves_of("torch_cifar")[wc.curve]),
            runtime=lambda wc: int(config["run"]["timeout_s"] * 8 / 60) + 5,
            gpu=run_gpus(),
        shell:
            "{PY} -m privbench sweep --curve-json {params.curve:q} --records-dir {params.records}"
            " --output {output} > {log} 2>&1"

    rule torch_cifar_table:
        input:
            curve_summaries("torch_cifar"),
        output:
            f"{RESULTS}/tables/torch_cifar.csv",
        log:
            f"{RESULTS}/logs/torch_cifar/table.log",
        shell:
            "{PY} -m privbench aggregate --output {output} {input} > {log} 2>&1"

    rule torch_cifar_page:
        input:
            table=f"{RESULTS}/tables/torch_cifar.csv",
        output:
            page_outputs("torch_cifar"),
        log:
            f"{RESULTS}/logs/torch_cifar/page.log",
        params:
            config=CONFIG_JSON,
        shell:
            "{PY} -m privbench report torch_cifar --config-json {params.config:q} --table {input.table} > {log} 2>&1"

    localrules: torch_cifar_table, torch_cifar_page
