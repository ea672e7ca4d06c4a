"""fio runs for the random I/O sections (smallio, bitmaps): job file, invocation, numbers.

One fio invocation runs a workload against several NBD servers in turn (one
stonewalled job per server, fio's nbd engine) and reads fio's JSON report:
IOPS, p99 completion latency, requests, and the CPU of fio's job processes.
"""

import json
import os


def job_file(workload, jobs, seconds):
    """A fio job file: the workload once per (name, uri), one after the other (stonewall)."""
    lines = ["[global]", "ioengine=nbd", "rw=" + workload.rw, "bs=%d" % workload.bs,
             "iodepth=%d" % workload.iodepth, "numjobs=%d" % workload.numjobs,
             "group_reporting", "time_based", "runtime=%dms" % round(seconds * 1000),
             "norandommap", "randrepeat=0", ""]
    for name, uri in jobs:
        # fio's job files expand ${VAR} and treat ';' and '#' as comments: a socket
        # path in our temporary folder has none of them.
        lines += ["[%s]" % name, "uri=" + uri, "stonewall", ""]
    return "\n".join(lines)


def fio(bench, workload, jobs, seconds):
    """One fio invocation running the workload against each (name, uri) in turn.

    Returns {name: (IOPS, p99 completion latency in us, requests completed, CPU
    seconds of fio's job processes)}.  One invocation for many servers: fio
    itself takes ~0.4 s to start and stop.
    """
    path = bench.path("jobs.fio")
    out = bench.path("fio.json")
    with open(path, "w") as f:
        f.write(job_file(workload, jobs, seconds))
    try:
        bench.run(["fio", "--eta=never", "--output-format=json", "--output=" + out, path])
        with open(out) as f:
            result = json.load(f)
    finally:
        _unlink(path)
        _unlink(out)
    measured = {}
    for job in result["jobs"]:
        stats = job[workload.op]
        if job.get("error") or not stats.get("total_ios"):
            raise RuntimeError("fio %s on %s: error %s, %s requests" % (
                workload.key, job["jobname"], job.get("error"), stats.get("total_ios")))
        p99 = stats["clat_ns"]["percentile"]["99.000000"] / 1000
        # usr_cpu, sys_cpu: percent of job_runtime (ms, summed over numjobs).
        cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
        measured[job["jobname"]] = (stats["iops"], p99, stats["total_ios"], cpu)
    missing = [name for name, _ in jobs if name not in measured]
    if missing:
        raise RuntimeError("fio %s: no result for %s" % (workload.key, ", ".join(missing)))
    return measured



def _unlink(path):
    if os.path.exists(path):
        os.unlink(path)
