-- The token of a job's current claim: a runner's heartbeats and outcome must name it, so one whose
-- lease ran out (and whose job was claimed again, or deleted and uploaded again) no longer speaks
-- for the job.
ALTER TABLE jobs ADD COLUMN claim TEXT;
