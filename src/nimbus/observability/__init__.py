"""What Nimbus records about running functions: logs (:mod:`nimbus.observability.logs`)."""
