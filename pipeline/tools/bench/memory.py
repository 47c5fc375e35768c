"""Peak memory of the driver, the Ray workers and Ray's daemons while the pipeline runs."""

from __future__ import annotations

import threading


class MemorySampler:
    """Peak resident memory of this process and of every Ray worker under it, sampled on a thread."""

    def __init__(self, interval_s: float = 0.25, exclude: tuple[int, ...] = ()):
        self.interval_s = interval_s
        self.exclude = set(exclude)
        self.driver_peak = 0
        self.workers_peak = 0  # all Ray workers together, at one instant
        self.worker_peak = 0  # the largest single worker
        self.worker_peak_title = ""
        self.ray_system_peak = 0  # raylet, GCS and other Ray daemons together
        # RSS counts the pages of Ray's shared-memory object store a worker has touched, which grow with the
        # data streamed through it up to the store's size; RSS minus shared pages is the memory a process owns.
        self.driver_private_peak = 0
        self.workers_private_peak = 0
        self.worker_private_peak = 0
        self.worker_private_peak_title = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        driver = psutil.Process()
        while not self._stop.is_set():
            own = driver.memory_info()
            self.driver_peak = max(self.driver_peak, own.rss)
            self.driver_private_peak = max(self.driver_private_peak, own.rss - own.shared)
            workers = system = workers_private = 0
            for child in driver.children(recursive=True):
                if child.pid in self.exclude:
                    continue
                try:
                    info = child.memory_info()
                    title = " ".join(child.cmdline()).strip()[:80]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, private = info.rss, info.rss - info.shared
                if title.startswith("ray::"):
                    workers += rss
                    workers_private += private
                    if rss > self.worker_peak:
                        self.worker_peak, self.worker_peak_title = rss, title
                    if private > self.worker_private_peak:
                        self.worker_private_peak, self.worker_private_peak_title = private, title
                else:
                    system += rss
            self.workers_peak = max(self.workers_peak, workers)
            self.workers_private_peak = max(self.workers_private_peak, workers_private)
            self.ray_system_peak = max(self.ray_system_peak, system)
            self._stop.wait(self.interval_s)

    def figures(self) -> dict[str, object]:
        mib = 2**20
        return {
            "driver_peak_rss_mib": round(self.driver_peak / mib, 1),
            "workers_peak_rss_mib": round(self.workers_peak / mib, 1),
            "largest_worker_peak_rss_mib": round(self.worker_peak / mib, 1),
            "largest_worker": self.worker_peak_title,
            "ray_daemons_peak_rss_mib": round(self.ray_system_peak / mib, 1),
            "driver_peak_private_mib": round(self.driver_private_peak / mib, 1),
            "workers_peak_private_mib": round(self.workers_private_peak / mib, 1),
            "largest_worker_peak_private_mib": round(self.worker_private_peak / mib, 1),
            "largest_private_worker": self.worker_private_peak_title,
        }
