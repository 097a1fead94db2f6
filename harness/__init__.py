"""The local service harness shared by the tests and the benchmarks: private brokers and databases on free
loopback ports (cluster), port helpers (net), a moto S3 server (s3_server), small real models (models) and test
images (images).

Development only: it is not installed with the product, and the product packages never import it.
"""
