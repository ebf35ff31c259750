"""Interoperability with the MTT family of scripts (MTT, FTD, DATM, TESLA, the MCT authors' code)
and the DD-Ranking benchmark: read their expert buffers, write their synthetic-set files, compute
the scores the field compares by.

Modules (each with one job; only ``h5out`` touches the HDF5 artifact):

* ``torchfile``  — a restricted, streaming reader of ``torch.save`` files (never runs code).
* ``buffers``    — numbered ``replay_buffer_{n}.pt`` folders: discovery, shape checks, ConvNet
  spec inference, expert-by-expert reading.
* ``compressed`` — the MCT authors' ``waypoint_buffer*`` / ``step_buffer*`` pairs → /convex rows.
* ``importer``   — streaming, resumable import of either into one mctool buffer.
* ``h5out``      — the adapter onto the artifact store (create buffer, write rows, read synsets).
* ``export``     — synsets as MTT / DD-Ranking tensor files and per-class PNG folders, and a loader.
* ``synsets_import`` — synthetic sets made elsewhere (the scripts' ``images_*.pt``, DD-Ranking
  folders, our exports), checked, into a synset file ``evaluate`` scores.
* ``scores``     — gain over random real images and DD-Ranking's hard-label recovery (HLR).
"""
