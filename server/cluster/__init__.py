"""Scale-out deployment: engine replicas on Ray Serve behind a stateless ingress, with jobs in a shared store
(PostgreSQL rows, S3 or shared-disk objects) that any replica runs and any ingress serves."""
