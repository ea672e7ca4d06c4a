"""`jobctl metrics`: the disk, its jobs and the nbdkit process in Prometheus' text format.

One scrape is four QMP queries (query-block, query-block-jobs, query-jobs,
x-query-process) turned into gauges and counters by pure functions, so the
rendering is tested without a server.  Every name and label is listed in
docs/service.md.  A field the server does not send (an older server, a
query-block without `dirty-bitmaps`) leaves its metric out; nothing is
guessed.

Labels: `device` (the disk) on everything but `overlay_nbd_up`, `job_id`
and `type` on job metrics (not `job`: Prometheus gives every scraped series
a `job` label of its own).
"""

from .qmp_client import QMPError

PREFIX = "overlay_nbd_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# QEMU's JobStatus and BlockDeviceIoStatus: every value gets a series (1 for
# the current one), so a dashboard or an alert can name any of them.
JOB_STATES = ("undefined", "created", "running", "paused", "ready", "standby", "waiting",
              "pending", "aborting", "concluded", "null")
IO_STATES = ("ok", "failed", "nospace")
CLUSTER_STATES = ("data", "zero", "absent")


class Exposition:
    """Metric families in the order first added, each with HELP, TYPE and its samples."""

    def __init__(self):
        self._families = {}

    def add(self, name, kind, help_text, value, labels=None):
        """One sample of family PREFIX+name; a None value adds nothing."""
        if value is None:
            return
        family = self._families.setdefault(PREFIX + name, (kind, help_text, []))
        family[2].append((labels or {}, value))

    def text(self):
        lines = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append("# HELP %s %s" % (name, _escape_help(help_text)))
            lines.append("# TYPE %s %s" % (name, kind))
            for labels, value in samples:
                lines.append("%s%s %s" % (name, _labels(labels), _number(value)))
        return "\n".join(lines) + "\n"


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels):
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (key, _escape_label(value))
                             for key, value in labels.items())


def _escape_label(value):
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def collect(client, control_path):
    """Query the server through client (a connected QMPClient); the exposition text."""
    return render(control_path,
                  block=_optional(client, "query-block") or [],
                  block_jobs=_optional(client, "query-block-jobs") or [],
                  jobs=_optional(client, "query-jobs") or [],
                  process=_optional(client, "x-query-process"))


def render_down(control_path):
    """The exposition when the control socket did not answer: up 0 and nothing else."""
    out = Exposition()
    _up(out, control_path, 0)
    return out.text()


def render(control_path, block, block_jobs, jobs=(), process=None):
    """The exposition from QMP replies (lists as the commands return them)."""
    out = Exposition()
    _up(out, control_path, 1)
    device = block[0].get("device", "") if block else ""
    for disk in block:
        _disk(out, disk)
    statuses = {job.get("id"): job.get("status") for job in jobs}
    for info in block_jobs:
        _job(out, info, device, statuses)
    if process:
        _process(out, process, device)
    return out.text()


def _up(out, control_path, value):
    out.add("up", "gauge", "1 if the control socket answered this scrape, else 0", value,
            {"control": control_path})


def _disk(out, disk):
    d = {"device": disk.get("device", "")}
    out.add("disk_info", "gauge", "The served disk: base, pivoted-to target (active), state "
            "directory; always 1", 1,
            dict(d, base=disk.get("base") or "", active=disk.get("active") or "",
                 overlay=disk.get("overlay") or ""))
    out.add("disk_size_bytes", "gauge", "Size of the served disk", disk.get("size"), d)
    allocation = disk.get("allocation") or {}
    out.add("disk_cluster_size_bytes", "gauge", "Cluster size of the overlay",
            allocation.get("cluster-size"), d)
    for state in CLUSTER_STATES:
        out.add("disk_clusters", "gauge", "Overlay clusters by state: data (held by the "
                "overlay), zero, absent (read from the base)",
                allocation.get("%s-clusters" % state), dict(d, state=state))
    _states(out, "disk_io_status", "Guest-facing io-status (werror/rerror=stop): 1 for the "
            "current value", IO_STATES, disk.get("io-status"), d, "io_status")
    if "held" in disk:
        out.add("disk_stopped", "gauge", "1 while QMP stop holds client I/O",
                bool(disk["held"]), d)
    out.add("disk_held_requests", "gauge", "Client requests held by werror/rerror=stop until "
            "cont", disk.get("x-held-requests"), d)
    bitmaps = disk.get("dirty-bitmaps")
    if bitmaps is not None:
        out.add("disk_bitmaps", "gauge", "Dirty bitmaps on the disk", len(bitmaps), d)
        for bitmap in bitmaps:
            _bitmap(out, bitmap, d)


def _bitmap(out, bitmap, d):
    b = dict(d, bitmap=bitmap.get("name", ""))
    out.add("bitmap_dirty_bytes", "gauge", "Bytes a dirty bitmap marks as changed",
            bitmap.get("count"), b)
    out.add("bitmap_granularity_bytes", "gauge", "A dirty bitmap's granularity",
            bitmap.get("granularity"), b)
    for field in ("recording", "busy", "persistent", "inconsistent"):
        if field in bitmap:
            out.add("bitmap_" + field, "gauge", "1 if the dirty bitmap is %s" % field,
                    bool(bitmap[field]), b)


def _job(out, info, device, statuses):
    job_id = info.get("device", "")           # BlockJobInfo names the job id "device"
    j = {"job_id": job_id, "device": device, "type": info.get("type", "")}
    labels = dict(j, auto_finalize=_flag(info.get("auto-finalize")),
                  auto_dismiss=_flag(info.get("auto-dismiss")))
    for name, value in sorted((info.get("x-policies") or {}).items()):
        labels[name.replace("-", "_")] = value
    out.add("job_info", "gauge", "A block job and its policies (x-policies) as labels; "
            "always 1", 1, labels)
    status = info.get("status") or statuses.get(job_id)
    _states(out, "job_status", "Job state (QEMU's JobStatus): 1 for the current one",
            JOB_STATES, status, j, "status")
    _states(out, "job_io_status", "Job io-status: failed or nospace when an error stopped it",
            IO_STATES, info.get("io-status"), j, "io_status")
    out.add("job_offset_bytes", "gauge", "Job progress: bytes done (BlockJobInfo offset)",
            info.get("offset"), j)
    out.add("job_length_bytes", "gauge", "Job progress: offset plus the work still known "
            "(BlockJobInfo len; grows while clients write)", info.get("len"), j)
    out.add("job_copied_bytes_total", "counter", "Bytes of data the job wrote (x-copied-bytes, "
            "zero ranges not counted); rate() of it is the copy rate",
            info.get("x-copied-bytes"), j)
    out.add("job_speed_limit_bytes_per_second", "gauge", "The job's speed limit (0: none)",
            info.get("speed"), j)
    for field in ("busy", "paused", "ready", "actively-synced"):
        if field in info:
            out.add("job_" + field.replace("-", "_"), "gauge", "1 if the job is %s" % field,
                    bool(info[field]), j)
    out.add("job_failed", "gauge", "1 once the job has ended with an error",
            "error" in info, j)
    for count in info.get("x-error-counts") or ():
        out.add("job_errors_total", "counter", "I/O errors the job met, by operation and errno "
                "(x-error-counts; since the process started)", count.get("count"),
                dict(j, operation=count.get("operation", ""), errno=count.get("errno", "")))
    last = info.get("x-last-error")
    if isinstance(last, dict) and isinstance(last.get("time"), dict):
        t = last["time"]
        out.add("job_last_error_time_seconds", "gauge", "When the job met its last I/O error "
                "(x-last-error), seconds since the epoch",
                t.get("seconds", 0) + t.get("microseconds", 0) / 1e6,
                dict(j, operation=last.get("operation", ""), errno=last.get("errno", "")))


def _process(out, process, device):
    d = {"device": device}
    for key, name, kind, help_text in (
            ("rss-bytes", "process_resident_memory_bytes", "gauge", "nbdkit's resident memory"),
            ("fds", "process_open_fds", "gauge", "nbdkit's open file descriptors"),
            ("fd-limit", "process_max_fds", "gauge", "nbdkit's descriptor limit (soft)"),
            ("threads", "process_threads", "gauge", "nbdkit's threads"),
            ("cpu-seconds", "process_cpu_seconds_total", "counter", "nbdkit's CPU time, "
             "user and system"),
            ("start-time", "process_start_time_seconds", "gauge", "When nbdkit started, "
             "seconds since the epoch"),
            ("nbd-connections", "client_connections", "gauge", "NBD client connections open"),
            ("nbd-connections-total", "client_connections_total", "counter",
             "NBD client connections accepted since nbdkit started")):
        out.add(name, kind, help_text, process.get(key), d)


def _states(out, name, help_text, states, current, labels, key):
    if current is None:
        return
    for state in states if current in states else states + (current,):
        out.add(name, "gauge", help_text, state == current, dict(labels, **{key: state}))


def _flag(value):
    return "" if value is None else ("true" if value else "false")


def _optional(client, command):
    """A query's return value, or None where the server has no such command."""
    try:
        return client.execute(command)
    except QMPError as e:
        if e.cls == "CommandNotFound":
            return None
        raise
