# The docs index and the static site.

rule docs_index:
    input:
        # the index's reproduction scorecard gathers every page's claims from their tables
        [f"{RESULTS}/tables/{name}.csv" for name in config["experiments"]],
    output:
        f"{DOCS}/index.md",
        f"{ASSETS}/{privbench_scorecard.INDEX_CHART}",
    params:
        config=CONFIG_JSON,
    log:
        f"{RESULTS}/logs/docs_index.log",
    shell:
        "{PY} -m privbench index --config-json {params.config:q} > {log} 2>&1"


rule site:
    """`snakemake --cores all site`: the pages as a static site (mkdocs build --strict)."""
    input:
        f"{DOCS}/index.md",
        [page_outputs(name) for name in config["experiments"]],
    output:
        directory(config["site_dir"]),
    log:
        f"{RESULTS}/logs/site.log",
    shell:
        "PRIVBENCH_DOCS_DIR={DOCS:q} PRIVBENCH_ASSETS_DIR={ASSETS:q} PRIVBENCH_SITE_DIR={output:q}"
        " {PY} -m mkdocs build --strict -f mkdocs.yml > {log} 2>&1"


localrules: docs_index, site
