# Data sets: pulled once into the cache (config data.dir), checksum verified,
# read by every page and framework from there.

DATA = config["data"]["dir"]


rule cifar100:
    """CIFAR-100 (python version) from data.cifar100.url, checked against data.cifar100.md5."""
    output:
        [f"{DATA}/cifar-100-python/{name}" for name in ("train", "test", "meta")],
    params:
        url=config["data"]["cifar100"]["url"],
        md5=config["data"]["cifar100"]["md5"],
    log:
        f"{RESULTS}/logs/cifar100.log",
    shell:
        "{PY} -m privbench fetch-cifar100 --url {params.url:q} --md5 {params.md5:q} --data-dir {DATA:q}"
        " > {log} 2>&1"


localrules: cifar100
