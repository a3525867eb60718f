"""The study: its config (:mod:`.config`), its plan (:mod:`.plan`), its Slurm resources
(:mod:`.slurm`), the checks a model cannot express (:mod:`.checks`), the preflight of its
files (:mod:`.files`) and ``scalelab plan`` (:mod:`.cli`)."""
