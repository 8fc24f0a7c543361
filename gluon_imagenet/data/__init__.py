"""The data stage: image trees to RecordIO, what a data root holds, and the iterators that read it."""
