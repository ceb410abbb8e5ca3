"""Peak memory of a process tree, sampled in a background thread (psutil, installed with Ray)."""
from __future__ import annotations

import os
import threading

import psutil


class PeakMemory:
    """Samples every `interval` s the RSS of `pid` and all its descendants (a local Ray instance's
    raylet and workers are descendants of the driver). Records the largest single process RSS
    whose command line matches `match` (None: any), and the largest total PSS of the tree (PSS
    shares mapped libraries between processes instead of counting them in each). With `cluster`
    (a Ray cluster's GCS address, HOST:PORT), the processes of that cluster's raylets on this
    machine count too (the workers of a cluster this process only connected to), and no other
    Ray's: a second Ray on the machine is not this run's.

    RSS is read at every sample (cheap: /proc/PID/statm); PSS walks each process's page tables
    (/proc/PID/smaps_rollup, about 17 ms for a process that imported torch), so it is read at the first
    and last samples and whenever the tree's total RSS exceeds by `pss_growth` the largest total at
    which it was read: the tree's PSS peaks where its memory does, and is read there or within
    `pss_growth` of it. Reading it at every sample took a whole core of a 2-core machine during a sweep
    of 30 processes, away from the trials being measured."""

    def __init__(self, pid: int | None = None, interval: float = 0.5, match: str | None = None,
                 cluster: str | None = None, pss_growth: float = 0.02):
        self.root = psutil.Process(pid or os.getpid())
        self.interval, self.match, self.cluster, self.pss_growth = interval, match, cluster, pss_growth
        self.peak_process_rss = 0
        self.peak_total_pss = 0
        self._rss_at_pss = 0  # the tree's total RSS when PSS was last read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cluster_processes(self) -> set:
        """The raylets started with --gcs-address=<cluster> and everything under them."""
        found = set()
        flag = f"--gcs-address={self.cluster}"
        for p in psutil.process_iter(["cmdline"]):
            try:
                if flag in (p.info["cmdline"] or []):
                    found.update([p, *p.children(recursive=True)])
            except psutil.Error:
                continue
        return found

    def _sample(self, force_pss: bool = False) -> None:
        try:
            procs = {self.root, *self.root.children(recursive=True)}
        except psutil.Error:
            return
        if self.cluster:
            procs |= self._cluster_processes()
        alive, total_rss = [], 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            alive.append(p)
            total_rss += rss
            if self.match is None or self.match in cmd:
                self.peak_process_rss = max(self.peak_process_rss, rss)
        if not force_pss and total_rss <= self._rss_at_pss * (1 + self.pss_growth):
            return
        self._rss_at_pss = max(self._rss_at_pss, total_rss)
        total = 0
        for p in alive:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            total += getattr(info, "pss", info.rss)
        self.peak_total_pss = max(self.peak_total_pss, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._sample(force_pss=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(force_pss=True)
