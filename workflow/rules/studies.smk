# One rule set for every study (privbench/studies/<study>/): per curve one job (its
# batch sizes in sequence, one process per run), then the tidy table, then the page.
# The rules are written once, in a loop that names them after the study
# (throughput_curve, throughput_table, throughput_page, ...).

for study in config["experiments"]:

    rule:
        name: f"{study}_curve"
        input:
            data_files(study),
        output:
            f"{RESULTS}/curves/{study}/{{curve}}.json",
        log:
            f"{RESULTS}/logs/{study}/{{curve}}.log",
        params:
            # default arguments bind this iteration's study (the lambdas run later)
            curve=lambda wc, study=study: json.dumps(curves_of(study)[wc.curve], sort_keys=True),
            records=f"{RESULTS}/runs/{study}",
        threads: run_threads()
        resources:
            mem_mb=lambda wc, study=study: privbench_curves.memory_mb(curves_of(study)[wc.curve]),
            runtime=lambda wc, study=study: privbench_curves.runtime_min(curves_of(study)[wc.curve]),
            gpu=run_gpus(),
            **slurm_site_resources(),
        shell:
            # 3>&2: one line per finished run on Snakemake's terminal too (privbench.progress)
            "{PY} -m privbench sweep --curve-json {params.curve:q} --records-dir {params.records}"
            " --output {output} --progress-fd 3 3>&2 > {log} 2>&1"

    rule:
        name: f"{study}_table"
        input:
            curve_summaries(study),
        output:
            f"{RESULTS}/tables/{study}.csv",
        log:
            f"{RESULTS}/logs/{study}/table.log",
        localrule: True
        shell:
            "{PY} -m privbench aggregate --output {output} {input} > {log} 2>&1"

    rule:
        name: f"{study}_page"
        input:
            table=f"{RESULTS}/tables/{study}.csv",
            # the page reads the records the table names; the summaries list them
            summaries=curve_summaries(study),
        output:
            page_outputs(study),
        log:
            f"{RESULTS}/logs/{study}/page.log",
        params:
            config=CONFIG_JSON,
            study=study,
        localrule: True
        shell:
            "{PY} -m privbench report {params.study} --config-json {params.config:q} --table {input.table}"
            " > {log} 2>&1"
