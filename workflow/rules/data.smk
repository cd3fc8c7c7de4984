# Data sets: pulled once into the cache (config data.dir), checksum verified,
# read by every page and framework from there.

from privbench.data import cifar100 as privbench_cifar100

DATA = config["data"]["dir"]
# A data set is identified by its MD5, never by where it came from: the URL is no
# param (Snakemake reruns a job whose params changed, deleting its outputs first),
# and the output is a marker per MD5, not the extracted files, so that a mirror
# that moved, or one unreachable today, never costs the verified data or the runs
# made with it. The job reads the URL when it runs; with the data of this MD5 in
# place it downloads nothing (privbench.data.cifar100.fetch).
CIFAR100_URL = config["data"]["cifar100"]["url"]
CIFAR100_MD5 = config["data"]["cifar100"]["md5"]


rule cifar100:
    """CIFAR-100 (python version) from data.cifar100.url, checked against data.cifar100.md5."""
    output:
        str(privbench_cifar100.verified_marker(DATA, CIFAR100_MD5)),
    log:
        f"{RESULTS}/logs/cifar100.log",
    shell:
        # 3>&2: download progress on the terminal too (privbench.progress)
        "{PY} -m privbench fetch-cifar100 --url {CIFAR100_URL:q} --md5 {CIFAR100_MD5:q}"
        " --data-dir {DATA:q} --progress-fd 3 3>&2 > {log} 2>&1"


localrules: cifar100
