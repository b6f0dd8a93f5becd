-- Argo CD resource health for edgeml.dev/EdgeModel (resource.customizations.health.edgeml.dev_EdgeModel).
-- Argo CD runs custom checks without Lua's string library, so this script uses only base and table.
--   Healthy      Ready=True for the current generation, nothing Degraded
--   Degraded     Degraded=True or Stalled=True, or Ready=False with a reason that will not pass by waiting
--   Progressing  anything else: no status yet, generation not observed, builds or rollout under way
local failure_reasons = {
  BuildFailed = true, ValidationFailed = true, InvalidSpec = true, NoNodes = true,
  ClassFailed = true, RolledBack = true, Failed = true,
}

local function progressing(message)
  return {status = "Progressing", message = message}
end

if obj.status == nil or obj.status.conditions == nil then
  return progressing("Waiting for the operator to report status")
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  return progressing("Waiting for the operator to observe generation " .. generation)
end

local conditions = {}
for _, condition in ipairs(obj.status.conditions) do
  conditions[condition.type] = condition
end

local function describe(condition)
  local text = condition.reason or condition.type
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  if obj.status.classesReady ~= nil then
    text = text .. " (" .. obj.status.classesReady .. " classes serving)"
  end
  return text
end

for _, kind in ipairs({"Stalled", "Degraded"}) do
  local condition = conditions[kind]
  if condition ~= nil and condition.status == "True" then
    return {status = "Degraded", message = describe(condition)}
  end
end

local ready = conditions["Ready"]
if ready == nil then
  return progressing("Waiting for the Ready condition")
end
if ready.observedGeneration ~= nil and generation ~= nil and ready.observedGeneration < generation then
  return progressing("Waiting for Ready of generation " .. generation)
end
if ready.status == "True" then
  return {status = "Healthy", message = describe(ready)}
end
for _, kind in ipairs({"Ready", "EnginesBuilt", "Validated"}) do
  local condition = conditions[kind]
  if condition ~= nil and condition.status == "False" and failure_reasons[condition.reason] then
    return {status = "Degraded", message = describe(condition)}
  end
end
return progressing(describe(ready))
