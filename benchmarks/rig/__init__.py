"""The rig the demo, the benchmarks and the integration tests share: real gunicorn
processes and simulated users (:mod:`.harness`), load generators (:mod:`.loadgen`), a
delaying proxy (:mod:`.delay`) and the peers' apps (:mod:`.peer_apps`)."""
