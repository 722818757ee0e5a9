"""Durable, asynchronous delivery of selected samples: prepare, spool, upload.

```
Collector.submit() ─▶ bounded queue ─▶ prepare (decode, orient, resize, JPEG, scale boxes)
                                         ─▶ Spool (on disk, crash-safe, bounded)
                                              ─▶ Uploader workers ─▶ Sink (roboflow | directory)
```
"""
