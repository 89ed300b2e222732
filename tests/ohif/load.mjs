// Loads a DICOM SR or SEG the way OHIF Viewers 3.13 does, so the node's tests can tell whether a
// radiologist's viewer opens what the node writes.
//
//   node load.mjs sr  REPORT.dcm  SOURCE.dcm...   -> {ok, error, measurements, viewport, hydration, warnings}
//   node load.mjs seg SEG.dcm     SOURCE.dcm...   -> {ok, error, segments, warnings}
//
// One JSON object on stdout; exit 0 whether or not the load failed (the JSON says so), non-zero only
// for a fault of this harness. The libraries are the ones OHIF 3.13.13 pins (package-lock.json):
// dcmjs 0.52.0, @cornerstonejs/adapters, core and tools 5.6.8. The OHIF logic between them is
// copied, quirks included, from the published bundles (OHIF's source is not in these packages);
// each copy names its bundle and the source file it was built from:
//   SR:  @ohif/extension-cornerstone-dicom-sr 3.13.13, dist/ohif-extension-cornerstone-dicom-sr.umd.js
//   SEG: @ohif/extension-cornerstone-dicom-seg 3.13.2 (the newest 3.13 on the registry; same adapters
//        5.6.8), dist/ohif-extension-cornerstone-dicom-seg.umd.js
//   metadata: @ohif/core 3.13.13 (DicomMetadataStore, MetadataProvider, ImageSet),
//        @ohif/extension-default 3.13.13 (DICOMweb data source, stack SOP class handler),
//        @ohif/extension-cornerstone 3.13.13 (metadata providers, measurement mappings, segmentationService).
// Files are read as OHIF's DicomMetadataStore.addInstance reads an ArrayBuffer and addressed by WADO-RS
// imageIds as OHIF's DICOMweb data source builds them (imageRendering "wadors"). Stand-ins for the
// browser: the image loader that hands a SEG's frames to the adapters in place of dicom-image-loader
// fetching them from a DICOMweb server (registerFrameLoader), and one global class (HTMLDivElement).

import { readFileSync } from 'node:fs';
import { format } from 'node:util';

// stdout carries the JSON alone: the libraries' console output goes to stderr, warnings are kept.
const warnings = [];
const toStderr = (...args) => process.stderr.write(`${format(...args)}\n`);
console.log = console.info = console.debug = toStderr;
console.warn = (...args) => {
  const text = args
    .filter((a) => typeof a === 'string' || a instanceof Error)
    .map(String)
    .join(' ');
  if (text) warnings.push(text);
  toStderr(...args);
};
// The one browser global @cornerstonejs/tools' addAnnotation tests for (an `instanceof` check).
globalThis.HTMLDivElement ??= class HTMLDivElement {};

const { data: dcmjsData } = await import('dcmjs');
const csCore = await import('@cornerstonejs/core');
const csTools = await import('@cornerstonejs/tools');
const { adaptersSR, adaptersSEG } = await import('@cornerstonejs/adapters');
const { vec3 } = await import('gl-matrix');

const { DicomMessage, DicomMetaDictionary } = dcmjsData;
const { metaData, utilities: csUtils, imageLoader } = csCore;

/** A limit of this harness, not an OHIF failure: it ends the run with a non-zero exit. */
class HarnessError extends Error {}

const WADO_ROOT = 'https://pacs.invalid/dicomweb'; // never fetched: imageIds only carry the UIDs

const sopClass = {
  BasicTextSR: '1.2.840.10008.5.1.4.1.1.88.11',
  EnhancedSR: '1.2.840.10008.5.1.4.1.1.88.22',
  ComprehensiveSR: '1.2.840.10008.5.1.4.1.1.88.33',
  Comprehensive3DSR: '1.2.840.10008.5.1.4.1.1.88.34',
  Segmentation: '1.2.840.10008.5.1.4.1.1.66.4',
  LabelmapSegmentation: '1.2.840.10008.5.1.4.1.1.66.7',
};

// ---------------------------------------------------------------------------------------------
// @ohif/core 3.13.13: DicomMetadataStore (services/DicomMetadataStore), its multi-frame proxy,
// and the DICOMweb data source's per-instance imageIds (extension-default DicomWebDataSource,
// _retrieveSeriesMetadataAsync + getImageIdsForInstance + getImageIdsForDisplaySet).

const studies = new Map(); // StudyInstanceUID -> SeriesInstanceUID -> SOPInstanceUID -> instance
const transferSyntaxes = new Map(); // SOPInstanceUID -> Transfer Syntax UID, for the frame loader

const MULTIFRAME_PROXIED = ['ImagePositionPatient', 'ImageOrientationPatient', 'PixelSpacing'];
const isMetadataProxy = Symbol('isMetadataProxy');

function addMultiframeProxy(instance) {
  if (!instance || instance[isMetadataProxy]) return instance;
  for (const key of MULTIFRAME_PROXIED) {
    if (key in instance) continue;
    Object.defineProperty(instance, key, {
      configurable: true,
      enumerable: true,
      get: () => instance._parentInstance?.[key] ?? instance._parentInstance?._shared?.[key],
      set: (value) => {
        Object.defineProperty(instance, key, { writable: true, enumerable: true, value });
      },
    });
  }
  Object.defineProperty(instance, isMetadataProxy, { value: true });
  return instance;
}

function defineHidden(object, key, value) {
  Object.defineProperty(object, key, { value, enumerable: false, writable: true, configurable: true });
}

function getImageIdsForInstance({ instance, frame }) {
  if (!instance) return undefined;
  if (instance.imageId && frame === undefined) return instance.imageId;
  const { StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID } = instance;
  const base = `${WADO_ROOT}/studies/${StudyInstanceUID}/series/${SeriesInstanceUID}/instances/${SOPInstanceUID}`;
  return `wadors:${base}/frames/${frame || 1}`;
}

function getImageIdsForDisplaySet(displaySet) {
  const imageIds = [];
  if (!displaySet.images) return imageIds;
  displaySet.images.forEach((instance) => {
    const { NumberOfFrames } = instance;
    if (NumberOfFrames > 1) {
      for (let frame = 1; frame <= NumberOfFrames; frame++) {
        imageIds.push(getImageIdsForInstance({ instance, frame }));
      }
    } else {
      imageIds.push(getImageIdsForInstance({ instance }));
    }
  });
  return imageIds;
}

/** Reads a Part-10 file as DicomMetadataStore.addInstance(ArrayBuffer) does, and gives it its imageId. */
function addInstance(path) {
  const bytes = readFileSync(path);
  const arrayBuffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const { dict, meta } = DicomMessage.readFile(arrayBuffer);
  let instance = DicomMetaDictionary.naturalizeDataset(dict);
  if (instance.NumberOfFrames > 1) instance = addMultiframeProxy(instance);
  defineHidden(instance, 'wadoRoot', WADO_ROOT);
  defineHidden(instance, 'imageId', getImageIdsForInstance({ instance }));
  const { StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID } = instance;
  transferSyntaxes.set(SOPInstanceUID, meta['00020010']?.Value?.[0]);
  if (!studies.has(StudyInstanceUID)) studies.set(StudyInstanceUID, new Map());
  const series = studies.get(StudyInstanceUID);
  if (!series.has(SeriesInstanceUID)) series.set(SeriesInstanceUID, new Map());
  if (!series.get(SeriesInstanceUID).has(SOPInstanceUID))
    series.get(SeriesInstanceUID).set(SOPInstanceUID, instance);
  return instance;
}

function getInstance(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) {
  return studies.get(StudyInstanceUID)?.get(SeriesInstanceUID)?.get(SOPInstanceUID);
}

// ---------------------------------------------------------------------------------------------
// @ohif/core 3.13.13 classes/MetadataProvider: what cornerstone (and the adapters) read through
// metaData.get. Only the modules the SR and SEG paths ask for are copied; the rest return undefined.

const toNumber = (value) =>
  Array.isArray(value)
    ? [...value].map((v) => (v !== undefined ? Number(v) : v))
    : value !== undefined
      ? Number(value)
      : value;

// combineFrameInstance (utils/combineFrameInstance): a frame's view of a multi-frame instance, with
// the shared and that frame's functional-group attributes flattened onto it.
function createFrameView(parent, items, key) {
  if (parent[key]) return parent[key];
  const view = Object.create(parent);
  Object.defineProperty(parent, key, { value: view, writable: false, enumerable: false });
  if (items) {
    Object.values(items)
      .filter(Boolean)
      .map((sequence) => sequence[0])
      .filter((item) => typeof item === 'object')
      .forEach((item) => {
        if (!item.SOPInstanceUID) Object.entries(item).forEach(([name, value]) => (view[name] = value));
      });
  }
  return view;
}

function combineFrameInstance(frame, instance) {
  const { PerFrameFunctionalGroupsSequence, SharedFunctionalGroupsSequence, NumberOfFrames, ImageType } =
    instance;
  if (NumberOfFrames < 2) return instance;
  instance.ImageType =
    (Array.isArray(ImageType) && ImageType) ||
    (typeof ImageType === 'string' && ImageType.split('\\')) ||
    ImageType;
  const frameNumber = Number.parseInt(frame || 1);
  const detectorOnly =
    instance.DetectorInformationSequence &&
    (!instance.ImagePositionPatient || !instance.ImageOrientationPatient);
  if (
    (PerFrameFunctionalGroupsSequence && SharedFunctionalGroupsSequence) ||
    detectorOnly ||
    NumberOfFrames > 1
  ) {
    if (!instance.ImageOrientationPatient && instance.DetectorInformationSequence) {
      instance.ImageOrientationPatient = instance.DetectorInformationSequence[0].ImageOrientationPatient;
    }
    let position = instance.ImagePositionPatient;
    if (!instance.ImagePositionPatient && instance.DetectorInformationSequence) {
      const detectorPosition = instance.DetectorInformationSequence[0].ImagePositionPatient?.map(Number);
      const orientation = instance.ImageOrientationPatient?.map(Number);
      const spacing = Number(instance.SpacingBetweenSlices);
      if (orientation && spacing) {
        const row = vec3.fromValues(orientation[0], orientation[1], orientation[2]);
        const column = vec3.fromValues(orientation[3], orientation[4], orientation[5]);
        const normal = vec3.cross(vec3.create(), row, column);
        const p = vec3.scaleAndAdd(vec3.create(), detectorPosition, normal, spacing * (frameNumber - 1));
        position = [p[0], p[1], p[2]];
      }
    }
    if (!instance._parentInstance) {
      Object.defineProperty(instance, '_parentInstance', {
        value: { ...instance },
        enumerable: false,
        writable: false,
        configurable: false,
      });
    }
    const shared = createFrameView(instance._parentInstance, SharedFunctionalGroupsSequence?.[0], '_shared');
    const view = createFrameView(shared, PerFrameFunctionalGroupsSequence?.[frameNumber - 1], frameNumber);
    view.ImagePositionPatient = position ?? view.ImagePositionPatient ?? [0, 0, frameNumber];
    Object.defineProperty(view, 'frameNumber', {
      value: frameNumber,
      writable: true,
      enumerable: false,
      configurable: true,
    });
    return view;
  }
  return instance;
}

const imageURI = (imageId) =>
  (/^(http|https|dicomfile):\/\//.test(imageId) ? imageId : imageId.substring(imageId.indexOf(':') + 1))
    .split('&frame=')[0]
    .split('?frame=')[0];

const MetadataProvider = {
  imageURIToUIDs: new Map(),
  customMetadata: new Map(),

  addImageIdToUIDs(imageId, uids) {
    if (!imageId) throw new Error('MetadataProvider::Empty imageId');
    this.imageURIToUIDs.set(imageURI(imageId), uids);
  },

  addCustomMetadata(imageId, type, metadata) {
    const uri = imageURI(imageId);
    if (!this.customMetadata.has(type)) this.customMetadata.set(type, {});
    this.customMetadata.get(type)[uri] = metadata;
  },

  getUIDsFromImageID(imageId) {
    if (imageId.startsWith('wadors:')) {
      const parts = imageId.split('/studies/')[1].split('/');
      return {
        StudyInstanceUID: parts[0],
        SeriesInstanceUID: parts[2],
        SOPInstanceUID: parts[4],
        frameNumber: parts[6],
      };
    }
    const uids = this.imageURIToUIDs.get(imageURI(imageId));
    return uids ? { ...uids, frameNumber: uids.frameNumber || '1' } : undefined;
  },

  _getInstance(imageId) {
    if (!imageId) throw new Error('MetadataProvider::Empty imageId');
    const uids = this.getUIDsFromImageID(imageId);
    if (!uids) return undefined;
    const { StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, frameNumber } = uids;
    const instance = getInstance(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID);
    if (!instance) return undefined;
    const view = (frameNumber && combineFrameInstance(frameNumber, instance)) || instance;
    if (view) defineHidden(view, 'imageId', imageId);
    return view;
  },

  get(type, imageId) {
    if (Array.isArray(imageId)) return undefined;
    const instance = this._getInstance(imageId);
    if (type === 'instance') return instance;
    if (this.customMetadata.has(type)) {
      const custom = this.customMetadata.get(type)[imageURI(imageId)];
      if (custom) return custom;
    }
    if (!instance) return undefined;
    return instance[type] ? instance[type] : this._getCornerstoneDICOMImageLoaderTag(type, instance);
  },

  _getCornerstoneDICOMImageLoaderTag(type, instance) {
    if (type === 'imagePlaneModule') return imagePlaneModule(instance);
    switch (type) {
      case 'generalSeriesModule':
        return {
          modality: instance.Modality,
          seriesInstanceUID: instance.SeriesInstanceUID,
          seriesNumber: toNumber(instance.SeriesNumber),
          studyInstanceUID: instance.StudyInstanceUID,
          seriesDescription: instance.SeriesDescription,
          seriesDate: instance.SeriesDate,
          seriesTime: instance.SeriesTime,
        };
      case 'imagePixelModule':
        return {
          samplesPerPixel: toNumber(instance.SamplesPerPixel),
          photometricInterpretation: instance.PhotometricInterpretation,
          rows: toNumber(instance.Rows),
          columns: toNumber(instance.Columns),
          bitsAllocated: toNumber(instance.BitsAllocated),
          bitsStored: toNumber(instance.BitsStored),
          highBit: toNumber(instance.HighBit),
          pixelRepresentation: toNumber(instance.PixelRepresentation),
          planarConfiguration: toNumber(instance.PlanarConfiguration),
          pixelAspectRatio: toNumber(instance.PixelAspectRatio),
          smallestPixelValue: toNumber(instance.SmallestPixelValue),
          largestPixelValue: toNumber(instance.LargestPixelValue),
        };
      case 'sopCommonModule':
        return { sopClassUID: instance.SOPClassUID, sopInstanceUID: instance.SOPInstanceUID };
      case 'generalImageModule':
        return {
          sopInstanceUID: instance.SOPInstanceUID,
          instanceNumber: toNumber(instance.InstanceNumber),
          lossyImageCompression: instance.LossyImageCompression,
          lossyImageCompressionRatio: instance.LossyImageCompressionRatio,
          lossyImageCompressionMethod: instance.LossyImageCompressionMethod,
        };
      case 'generalStudyModule':
        return {
          studyDescription: instance.StudyDescription,
          studyInstanceUID: instance.StudyInstanceUID,
          studyDate: instance.StudyDate,
          studyTime: instance.StudyTime,
          accessionNumber: instance.AccessionNumber,
          studyId: instance.StudyID,
        };
      default:
        return undefined;
    }
  },
};

// The imagePlaneModule handler: an image without ImageOrientationPatient is taken as 1\0\0\0\1\0,
// without ImagePositionPatient as at 0\0\0, without a pixel spacing as 1 mm (usingDefaultValues).
function imagePlaneModule(instance) {
  const { ImageOrientationPatient, ImagePositionPatient } = instance;
  const { PixelSpacing, type } = csUtils.getPixelSpacingInformation(instance) || {};
  let rowPixelSpacing;
  let columnPixelSpacing;
  let rowCosines;
  let columnCosines;
  let imageOrientationPatient;
  let usingDefaultValues = false;
  let isDefaultValueSetForRowCosine = false;
  let isDefaultValueSetForColumnCosine = false;
  if (PixelSpacing) {
    [rowPixelSpacing, columnPixelSpacing] = PixelSpacing;
    if (!csUtils.calibratedPixelSpacingMetadataProvider.get('calibratedPixelSpacing', instance.imageId)) {
      csUtils.calibratedPixelSpacingMetadataProvider.add(instance.imageId, {
        rowPixelSpacing: parseFloat(PixelSpacing[0]),
        columnPixelSpacing: parseFloat(PixelSpacing[1]),
        type,
      });
    }
  } else {
    rowPixelSpacing = columnPixelSpacing = 1;
    usingDefaultValues = true;
  }
  if (ImageOrientationPatient) {
    rowCosines = toNumber(ImageOrientationPatient.slice(0, 3));
    columnCosines = toNumber(ImageOrientationPatient.slice(3, 6));
    imageOrientationPatient = toNumber(ImageOrientationPatient);
  } else {
    rowCosines = [1, 0, 0];
    columnCosines = [0, 1, 0];
    imageOrientationPatient = [1, 0, 0, 0, 1, 0];
    usingDefaultValues = true;
    isDefaultValueSetForRowCosine = true;
    isDefaultValueSetForColumnCosine = true;
  }
  const imagePositionPatient = toNumber(ImagePositionPatient) || [0, 0, 0];
  if (!ImagePositionPatient) usingDefaultValues = true;
  return {
    frameOfReferenceUID: instance.FrameOfReferenceUID,
    rows: toNumber(instance.Rows),
    columns: toNumber(instance.Columns),
    spacingBetweenSlices: toNumber(instance.SpacingBetweenSlices),
    imageOrientationPatient,
    rowCosines,
    isDefaultValueSetForRowCosine,
    columnCosines,
    isDefaultValueSetForColumnCosine,
    imagePositionPatient,
    sliceThickness: toNumber(instance.SliceThickness),
    sliceLocation: toNumber(instance.SliceLocation),
    pixelSpacing: toNumber(PixelSpacing || 1),
    rowPixelSpacing: rowPixelSpacing ? toNumber(rowPixelSpacing) : null,
    columnPixelSpacing: columnPixelSpacing ? toNumber(columnPixelSpacing) : null,
    usingDefaultValues,
  };
}

// @ohif/extension-cornerstone 3.13.13 init: the providers OHIF registers with cornerstone.
metaData.addProvider(csUtils.genericMetadataProvider.get, 9998);
metaData.addProvider(
  csUtils.calibratedPixelSpacingMetadataProvider.get.bind(csUtils.calibratedPixelSpacingMetadataProvider),
);
metaData.addProvider(MetadataProvider.get.bind(MetadataProvider), 9999);

// ---------------------------------------------------------------------------------------------
// Display sets: @ohif/core 3.13.13 ImageSet and DisplaySetService.getDisplaySetsForReferences,
// @ohif/extension-default 3.13.13 getSopClassHandlerModule (the "stack" handler).

let nextUid = 0;
const guid = () => `harness-display-set-${++nextUid}`;

function makeImageSet(images) {
  return {
    images,
    uid: guid(),
    instances: images,
    instance: images[0],
    StudyInstanceUID: images[0]?.StudyInstanceUID,
    setAttributes(attributes) {
      Object.assign(this, attributes);
    },
  };
}

const sortByInstanceNumber = (instances) =>
  instances.sort((a, b) => (Number(a.InstanceNumber) || 0) - (Number(b.InstanceNumber) || 0));

function makeStackDisplaySet(instances) {
  sortByInstanceNumber(instances);
  const first = instances[0];
  const imageSet = makeImageSet(instances);
  imageSet.setAttributes({
    displaySetInstanceUID: imageSet.uid,
    SeriesInstanceUID: first.SeriesInstanceUID,
    StudyInstanceUID: first.StudyInstanceUID,
    SeriesNumber: first.SeriesNumber || 0,
    SOPClassUID: first.SOPClassUID,
    Modality: first.Modality,
    isMultiFrame: first.NumberOfFrames > 1,
    numImageFrames: instances.length,
    SOPClassHandlerId: '@ohif/extension-default.sopClassHandlerModule.stack',
    FrameOfReferenceUID: first.FrameOfReferenceUID,
  });
  return imageSet;
}

/** The stack handler's grouping: one display set per multi-frame instance and per CR/MG/DX image,
 * the other single-frame images of a series together. */
function stackDisplaySetsFromSeries(instances) {
  const displaySets = [];
  const stacked = [];
  for (const instance of instances) {
    if (!instance.Rows) continue; // isImage(SOPClassUID) || Rows: the sources here are images
    if (instance.NumberOfFrames > 1 || ['CR', 'MG', 'DX'].includes(instance.Modality)) {
      displaySets.push(makeStackDisplaySet([instance]));
    } else {
      stacked.push(instance);
    }
  }
  if (stacked.length) displaySets.push(makeStackDisplaySet(stacked));
  return displaySets;
}

// The SOP classes the stack handler claims (extension-default getSopClassHandlerModule); DisplaySetService
// gives any other image class to the "unsupported" handler, whose display sets nothing is drawn on.
// prettier-ignore
const STACK_SOP_CLASS_UIDS = [
  '1.2.840.10008.5.1.4.1.1.1', '1.2.840.10008.5.1.4.1.1.1.1', '1.2.840.10008.5.1.4.1.1.1.1.1',
  '1.2.840.10008.5.1.4.1.1.1.2', '1.2.840.10008.5.1.4.1.1.1.2.1', '1.2.840.10008.5.1.4.1.1.1.3',
  '1.2.840.10008.5.1.4.1.1.1.3.1', '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.5.1.4.1.1.2.1',
  '1.2.840.10008.5.1.4.1.1.2.2', '1.2.840.10008.5.1.4.1.1.3.1', '1.2.840.10008.5.1.4.1.1.4',
  '1.2.840.10008.5.1.4.1.1.4.1', '1.2.840.10008.5.1.4.1.1.4.3', '1.2.840.10008.5.1.4.1.1.4.4',
  '1.2.840.10008.5.1.4.1.1.6.1', '1.2.840.10008.5.1.4.1.1.7', '1.2.840.10008.5.1.4.1.1.7.1',
  '1.2.840.10008.5.1.4.1.1.7.2', '1.2.840.10008.5.1.4.1.1.7.3', '1.2.840.10008.5.1.4.1.1.7.4',
  '1.2.840.10008.5.1.4.1.1.12.1', '1.2.840.10008.5.1.4.1.1.12.1.1', '1.2.840.10008.5.1.4.1.1.12.2',
  '1.2.840.10008.5.1.4.1.1.12.2.1', '1.2.840.10008.5.1.4.1.1.13.1.1', '1.2.840.10008.5.1.4.1.1.13.1.2',
  '1.2.840.10008.5.1.4.1.1.13.1.3', '1.2.840.10008.5.1.4.1.1.82.1', '1.2.840.10008.5.1.4.1.1.13.1.4',
  '1.2.840.10008.5.1.4.1.1.13.1.5', '1.2.840.10008.5.1.4.1.1.14.1', '1.2.840.10008.5.1.4.1.1.14.2',
  '1.2.840.10008.5.1.4.1.1.20', '1.2.840.10008.5.1.4.1.1.77.1.1', '1.2.840.10008.5.1.4.1.1.77.1.1.1',
  '1.2.840.10008.5.1.4.1.1.77.1.2', '1.2.840.10008.5.1.4.1.1.77.1.2.1', '1.2.840.10008.5.1.4.1.1.77.1.3',
  '1.2.840.10008.5.1.4.1.1.77.1.4', '1.2.840.10008.5.1.4.1.1.77.1.4.1', '1.2.840.10008.5.1.4.1.1.77.1.5.1',
  '1.2.840.10008.5.1.4.1.1.77.1.5.2', '1.2.840.10008.5.1.4.1.1.77.1.5.4', '1.2.840.10008.5.1.4.1.1.128',
  '1.2.840.10008.5.1.4.1.1.130', '1.2.840.10008.5.1.4.1.1.128.1', '1.2.840.10008.5.1.4.1.1.481.1',
  '1.2.840.10008.5.1.4.1.1.6.2', '1.2.840.10008.5.1.4.1.1.481.2',
];

function makeUnsupportedDisplaySet(instances) {
  const first = instances[0];
  const imageSet = makeImageSet(instances);
  imageSet.setAttributes({
    displaySetInstanceUID: imageSet.uid,
    SeriesInstanceUID: first.SeriesInstanceUID,
    StudyInstanceUID: first.StudyInstanceUID,
    SOPClassUID: first.SOPClassUID,
    Modality: first.Modality,
    unsupported: true,
    SOPClassHandlerId: 'unsupported',
  });
  return imageSet;
}

/** DisplaySetService.makeDisplaySetForInstances: per series and SOP class, the handler that claims it. */
function sourceDisplaySets(sources) {
  const groups = new Map();
  for (const instance of sources) {
    const key = `${instance.SeriesInstanceUID} ${instance.SOPClassUID}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(instance);
  }
  return [...groups.values()].flatMap((instances) =>
    STACK_SOP_CLASS_UIDS.includes(instances[0].SOPClassUID)
      ? stackDisplaySetsFromSeries(instances)
      : [makeUnsupportedDisplaySet(instances)],
  );
}

function getDisplaySetsForReferences(displaySets, referencedSeriesSequence) {
  const wanted = new Map();
  for (const reference of Array.isArray(referencedSeriesSequence)
    ? referencedSeriesSequence
    : [referencedSeriesSequence]) {
    const { SeriesInstanceUID, ReferencedInstanceSequence } = reference;
    if (!wanted.has(SeriesInstanceUID)) wanted.set(SeriesInstanceUID, new Set());
    const uids = wanted.get(SeriesInstanceUID);
    for (const item of ReferencedInstanceSequence) uids.add(item.ReferencedSOPInstanceUID);
  }
  return displaySets.filter((displaySet) => {
    const uids = wanted.get(displaySet.SeriesInstanceUID);
    return uids && displaySet.instances
      ? displaySet.instances.some((i) => uids.has(i.SOPInstanceUID))
      : undefined;
  });
}

// ---------------------------------------------------------------------------------------------
// SR: @ohif/extension-cornerstone-dicom-sr 3.13.13, built from src/getSopClassHandlerModule.ts,
// src/utils/isRehydratable.ts, src/utils/addSRAnnotation.ts, src/utils/getRenderableData.ts,
// src/viewports/OHIFCornerstoneSRMeasurementViewport.tsx and src/utils/hydrateStructuredReport.ts.

const CodeNameCodeSequenceValues = {
  ImagingMeasurementReport: '126000',
  ImageLibrary: '111028',
  ImagingMeasurements: '126010',
  MeasurementGroup: '125007',
  ImageLibraryGroup: '126200',
  TrackingUniqueIdentifier: '112040',
  TrackingIdentifier: '112039',
  Finding: '121071',
  FindingSite: 'G-C0E3',
  FindingSiteSCT: '363698007',
};
const { MeasurementReport, TEXT_ANNOTATION_POSITION, COMMENT_CODE, CodeScheme } = adaptersSR.Cornerstone3D;
const CodingSchemeDesignators = {
  SRT: 'SRT',
  SCT: 'SCT',
  CornerstoneCodeSchemes: [CodeScheme.CodingSchemeDesignator, 'CST4'],
};
const SCOORDTypes = {
  POINT: 'POINT',
  MULTIPOINT: 'MULTIPOINT',
  POLYLINE: 'POLYLINE',
  CIRCLE: 'CIRCLE',
  ELLIPSE: 'ELLIPSE',
};
const SR_SOP_CLASS_UIDS = [
  sopClass.BasicTextSR,
  sopClass.EnhancedSR,
  sopClass.ComprehensiveSR,
  sopClass.Comprehensive3DSR,
];
// The annotation types @ohif/extension-cornerstone 3.13.13 maps in its measurement service
// (initMeasurementService): isRehydratable and hydration keep only these.
const MEASUREMENT_SOURCE_ANNOTATION_TYPES = [
  'Length',
  'Crosshairs',
  'Bidirectional',
  'EllipticalROI',
  'CircleROI',
  'ArrowAnnotate',
  'CobbAngle',
  'Angle',
  'RectangleROI',
  'PlanarFreehandROI',
  'SplineROI',
  'CalibrationLine',
  'LivewireContour',
  'Probe',
  'UltrasoundDirectionalTool',
  'UltrasoundPleuraBLineTool',
  'SegmentBidirectional',
];

function _getDisplaySetsFromSeries(instances) {
  if (!instances || !instances.length) throw new Error('No instances were provided');
  sortByInstanceNumber(instances);
  const instance = instances[instances.length - 1];
  const {
    StudyInstanceUID,
    SeriesInstanceUID,
    SOPInstanceUID,
    SeriesDescription,
    SeriesNumber,
    ConceptNameCodeSequence,
    SOPClassUID,
  } = instance;
  const is3DSR = SOPClassUID === sopClass.Comprehensive3DSR;
  const isImagingMeasurementReport =
    ConceptNameCodeSequence?.CodeValue === CodeNameCodeSequenceValues.ImagingMeasurementReport;
  return [
    {
      Modality: 'SR',
      displaySetInstanceUID: guid(),
      SeriesDescription,
      SeriesNumber,
      SOPInstanceUID,
      SeriesInstanceUID,
      StudyInstanceUID,
      SOPClassHandlerId: `@ohif/extension-cornerstone-dicom-sr.sopClassHandlerModule.${is3DSR ? 'dicom-sr-3d' : 'dicom-sr'}`,
      SOPClassUID,
      instances,
      referencedImages: null,
      measurements: null,
      isDerivedDisplaySet: true,
      isLoaded: false,
      isImagingMeasurementReport,
      sopClassUids: SR_SOP_CLASS_UIDS,
      instance,
      predecessorImageId: instance.imageId,
    },
  ];
}

/** displaySet.load(): OHIF also fetches BulkDataURI values here; a Part-10 file holds them inline. */
function _load(srDisplaySet, activeDisplaySets) {
  const { ContentSequence } = srDisplaySet.instance;
  if (srDisplaySet.isImagingMeasurementReport) {
    srDisplaySet.referencedImages = _getReferencedImagesList(ContentSequence);
    srDisplaySet.measurements = _getMeasurements(ContentSequence);
  } else {
    srDisplaySet.referencedImages = [];
    srDisplaySet.measurements = [];
  }
  const { predecessorImageId } = srDisplaySet;
  for (const measurement of srDisplaySet.measurements) measurement.predecessorImageId = predecessorImageId;
  srDisplaySet.isHydrated = false;
  srDisplaySet.isRehydratable = isRehydratable(srDisplaySet, MEASUREMENT_SOURCE_ANNOTATION_TYPES);
  srDisplaySet.isLoaded = true;
  // sortDisplaySetsCopy(activeDisplaySets, {studyInstanceUIDFirst}) then, for each:
  activeDisplaySets.forEach((displaySet) => _checkIfCanAddMeasurementsToDisplaySet(srDisplaySet, displaySet));
}

function _checkIfCanAddMeasurementsToDisplaySet(srDisplaySet, newDisplaySet) {
  const unloadedMeasurements = srDisplaySet.measurements.filter(
    (measurement) => measurement.loaded === false,
  );
  if (!unloadedMeasurements.length || newDisplaySet.unsupported) return;
  const imageIdsByUIDAndFrame = new Map();
  for (const imageId of getImageIdsForDisplaySet(newDisplaySet)) {
    const { SOPInstanceUID, frameNumber } = MetadataProvider.getUIDsFromImageID(imageId);
    imageIdsByUIDAndFrame.set(`${SOPInstanceUID}:${frameNumber || 1}`, imageId);
  }
  if (!unloadedMeasurements?.length) return;
  const is3DSR = srDisplaySet.SOPClassUID === sopClass.Comprehensive3DSR;
  for (let j = unloadedMeasurements.length - 1; j >= 0; j--) {
    const measurement = unloadedMeasurements[j]; // (the "onBeforeSRAddMeasurement" customization is unset)
    const is3DMeasurement = measurement.coords?.[0]?.ValueType === 'SCOORD3D';
    if (
      is3DSR &&
      is3DMeasurement &&
      measurement.coords[0].ReferencedFrameOfReferenceSequence === newDisplaySet.FrameOfReferenceUID
    ) {
      addSRAnnotation({ measurement, displaySet: newDisplaySet });
      measurement.loaded = true;
      measurement.displaySetInstanceUID = newDisplaySet.displaySetInstanceUID;
      unloadedMeasurements.splice(j, 1);
      continue;
    }
    // OHIF 3.13: a group without SCOORD/SCOORD3D has coords [] and throws here, failing the whole load.
    const referencedSOPSequence = measurement.coords[0].ReferencedSOPSequence;
    if (!referencedSOPSequence) continue;
    const { ReferencedSOPInstanceUID } = referencedSOPSequence;
    const frame = referencedSOPSequence.ReferencedFrameNumber || 1;
    const imageId = imageIdsByUIDAndFrame.get(`${ReferencedSOPInstanceUID}:${frame}`);
    if (imageId && _measurementReferencesSOPInstanceUID(measurement, ReferencedSOPInstanceUID, frame)) {
      addSRAnnotation({ measurement, imageId, frameNumber: frame, displaySet: newDisplaySet });
      measurement.loaded = true;
      measurement.imageId = imageId;
      measurement.displaySetInstanceUID = newDisplaySet.displaySetInstanceUID;
      measurement.ReferencedSOPInstanceUID = ReferencedSOPInstanceUID;
      measurement.frameNumber = frame;
      unloadedMeasurements.splice(j, 1);
    }
  }
}

function _measurementReferencesSOPInstanceUID(measurement, SOPInstanceUID, frameNumber) {
  const { coords } = measurement;
  const ReferencedFrameNumber =
    (measurement.coords[0].ReferencedSOPSequence &&
      measurement.coords[0].ReferencedSOPSequence?.ReferencedFrameNumber) ||
    1;
  if (frameNumber && Number(frameNumber) !== Number(ReferencedFrameNumber)) return false;
  for (let j = 0; j < coords.length; j++) {
    const { ReferencedSOPInstanceUID } = coords[j].ReferencedSOPSequence;
    if (ReferencedSOPInstanceUID === SOPInstanceUID) return true;
  }
  return false;
}

function _getReferencedImagesList(ImagingMeasurementReportContentSequence) {
  const ImageLibrary = ImagingMeasurementReportContentSequence.find(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.ImageLibrary,
  );
  if (!ImageLibrary) return [];
  const ImageLibraryGroup = _getSequenceAsArray(ImageLibrary.ContentSequence).find(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.ImageLibraryGroup,
  );
  if (!ImageLibraryGroup) return [];
  const referencedImages = [];
  _getSequenceAsArray(ImageLibraryGroup.ContentSequence).forEach((item) => {
    const { ReferencedSOPSequence } = item;
    if (!ReferencedSOPSequence) return;
    for (const ref of _getSequenceAsArray(ReferencedSOPSequence)) {
      if (ref.ReferencedSOPClassUID) {
        const { ReferencedSOPClassUID, ReferencedSOPInstanceUID } = ref;
        referencedImages.push({ ReferencedSOPClassUID, ReferencedSOPInstanceUID });
      }
    }
  });
  return referencedImages;
}

function _getMeasurements(ImagingMeasurementReportContentSequence) {
  const ImagingMeasurements = ImagingMeasurementReportContentSequence.find(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.ImagingMeasurements,
  );
  if (!ImagingMeasurements) return [];
  const MeasurementGroups = _getSequenceAsArray(ImagingMeasurements.ContentSequence).filter(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.MeasurementGroup,
  );
  const merged = _getMergedContentSequencesByTrackingUniqueIdentifiers(MeasurementGroups);
  const measurements = [];
  Object.keys(merged).forEach((trackingUniqueIdentifier) => {
    const measurement = _processMeasurement(merged[trackingUniqueIdentifier]);
    if (measurement) measurements.push(measurement);
  });
  return measurements;
}

function _getMergedContentSequencesByTrackingUniqueIdentifiers(MeasurementGroups) {
  const merged = {};
  MeasurementGroups.forEach((MeasurementGroup) => {
    const ContentSequence = _getSequenceAsArray(MeasurementGroup.ContentSequence);
    const TrackingUIDContentItem = ContentSequence.find(
      (item) =>
        item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.TrackingUniqueIdentifier,
    );
    if (!TrackingUIDContentItem)
      console.warn('No Tracking Unique Identifier, skipping ambiguous measurement.');
    const trackingUniqueIdentifier = TrackingUIDContentItem.UID; // (3.13: throws when the UID is missing)
    if (merged[trackingUniqueIdentifier] === undefined) {
      merged[trackingUniqueIdentifier] = [...ContentSequence];
    } else {
      ContentSequence.forEach((item) => {
        if (item.ConceptNameCodeSequence.CodeValue !== CodeNameCodeSequenceValues.TrackingUniqueIdentifier) {
          merged[trackingUniqueIdentifier].push(item);
        }
      });
    }
  });
  return merged;
}

function _isTextAnnotationPosition(item) {
  const concept = item.ConceptNameCodeSequence[0];
  return (
    concept &&
    concept.CodeValue === TEXT_ANNOTATION_POSITION.value &&
    concept.CodingSchemeDesignator === TEXT_ANNOTATION_POSITION.schemeDesignator
  );
}

function _processMeasurement(mergedContentSequence) {
  if (
    mergedContentSequence.some(
      (group) =>
        (group.ValueType === 'SCOORD' || group.ValueType === 'SCOORD3D') && !_isTextAnnotationPosition(group),
    )
  ) {
    return _processTID1410Measurement(mergedContentSequence);
  }
  return _processNonGeometricallyDefinedMeasurement(mergedContentSequence);
}

function _processTID1410Measurement(mergedContentSequence) {
  const graphicItem = mergedContentSequence.find(
    (group) => group.ValueType === 'SCOORD' || group.ValueType === 'SCOORD3D',
  );
  const UIDREFContentItem = mergedContentSequence.find((group) => group.ValueType === 'UIDREF');
  const TrackingIdentifierContentItem = mergedContentSequence.find(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.TrackingIdentifier,
  );
  if (!graphicItem) {
    console.warn(`graphic ValueType ${graphicItem.ValueType} not currently supported, skipping annotation.`);
    return undefined;
  }
  const NUMContentItems = mergedContentSequence.filter((group) => group.ValueType === 'NUM');
  const { ConceptNameCodeSequence } = graphicItem;
  const { CodeValue, CodingSchemeDesignator } = ConceptNameCodeSequence;
  const coord = _getCoordsFromSCOORDOrSCOORD3D(graphicItem);
  const is3DMeasurement = coord.ValueType === 'SCOORD3D';
  const measurement = {
    loaded: false,
    labels: [],
    coords: [coord],
    TrackingUniqueIdentifier: UIDREFContentItem.UID,
    TrackingIdentifier: TrackingIdentifierContentItem.TextValue,
    graphicCode: `${CodingSchemeDesignator}:${CodeValue}`,
    is3DMeasurement,
    pointsLength: coord.GraphicData.length / (is3DMeasurement ? 3 : 2),
    graphicType: coord.GraphicType,
  };
  NUMContentItems.forEach((item) => {
    const { ConceptNameCodeSequence, MeasuredValueSequence } = item;
    if (MeasuredValueSequence)
      measurement.labels.push(
        _getLabelFromMeasuredValueSequence(ConceptNameCodeSequence, MeasuredValueSequence),
      );
  });
  const findingSites = mergedContentSequence.filter(
    (item) =>
      item.ConceptNameCodeSequence.CodingSchemeDesignator === CodingSchemeDesignators.SCT &&
      item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.FindingSiteSCT,
  );
  if (findingSites.length) {
    measurement.labels.push({
      label: CodeNameCodeSequenceValues.FindingSiteSCT,
      value: findingSites[0].ConceptCodeSequence.CodeMeaning,
    });
  }
  return measurement;
}

function _processNonGeometricallyDefinedMeasurement(mergedContentSequence) {
  const NUMContentItems = mergedContentSequence.filter((group) => group.ValueType === 'NUM');
  const UIDREFContentItem = mergedContentSequence.find((group) => group.ValueType === 'UIDREF');
  const TrackingIdentifierContentItem = mergedContentSequence.find(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.TrackingIdentifier,
  );
  const finding = mergedContentSequence.find(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.Finding,
  );
  const findingSites = mergedContentSequence.filter(
    (item) =>
      item.ConceptNameCodeSequence.CodingSchemeDesignator === CodingSchemeDesignators.SRT &&
      item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.FindingSite,
  );
  const commentSites = mergedContentSequence.filter(
    (item) =>
      item.ConceptNameCodeSequence.CodingSchemeDesignator === COMMENT_CODE.schemeDesignator &&
      item.ConceptNameCodeSequence.CodeValue === COMMENT_CODE.value,
  );
  const measurement = {
    loaded: false,
    labels: [],
    coords: [],
    TrackingUniqueIdentifier: UIDREFContentItem.UID,
    TrackingIdentifier: TrackingIdentifierContentItem.TextValue,
  };
  if (commentSites) {
    for (const item of commentSites) {
      if (item.TextValue) measurement.labels.push({ label: item.TextValue, value: '' });
    }
  }
  if (
    finding &&
    CodingSchemeDesignators.CornerstoneCodeSchemes.includes(
      finding.ConceptCodeSequence.CodingSchemeDesignator,
    ) &&
    finding.ConceptCodeSequence.CodeValue === CodeScheme.codeValues.CORNERSTONEFREETEXT
  ) {
    measurement.labels.push({
      label: CodeScheme.codeValues.CORNERSTONEFREETEXT,
      value: finding.ConceptCodeSequence.CodeMeaning,
    });
  }
  if (findingSites.length) {
    const cornerstoneFreeText = findingSites.find(
      (item) =>
        CodingSchemeDesignators.CornerstoneCodeSchemes.includes(
          item.ConceptCodeSequence.CodingSchemeDesignator,
        ) && item.ConceptCodeSequence.CodeValue === CodeScheme.codeValues.CORNERSTONEFREETEXT,
    );
    if (cornerstoneFreeText) {
      measurement.labels.push({
        label: CodeScheme.codeValues.CORNERSTONEFREETEXT,
        value: cornerstoneFreeText.ConceptCodeSequence.CodeMeaning,
      });
    }
  }
  NUMContentItems.forEach((item) => {
    const { ConceptNameCodeSequence, ContentSequence, MeasuredValueSequence } = item;
    if (ContentSequence) {
      const graphicItem = Array.isArray(ContentSequence)
        ? (ContentSequence.find(
            (g) => (g.ValueType === 'SCOORD' || g.ValueType === 'SCOORD3D') && !g.ConceptNameCodeSequence,
          ) ?? ContentSequence.find((g) => g.ValueType === 'SCOORD' || g.ValueType === 'SCOORD3D'))
        : ContentSequence;
      if (!graphicItem) {
        console.warn('ContentSequence array contains no SCOORD or SCOORD3D entry, skipping annotation.');
        return;
      }
      const { ValueType } = graphicItem;
      if (ValueType !== 'SCOORD' && ValueType !== 'SCOORD3D') {
        console.warn(`Graphic ${ValueType} not currently supported, skipping annotation.`);
        return;
      }
      const coords = _getCoordsFromSCOORDOrSCOORD3D(graphicItem);
      if (coords) measurement.coords.push(coords);
    }
    if (MeasuredValueSequence)
      measurement.labels.push(
        _getLabelFromMeasuredValueSequence(ConceptNameCodeSequence, MeasuredValueSequence),
      );
  });
  return measurement;
}

function _getCoordsFromSCOORDOrSCOORD3D(graphicItem) {
  const { ValueType, GraphicType, GraphicData } = graphicItem;
  const coords = { ValueType, GraphicType, GraphicData };
  coords.ReferencedSOPSequence = graphicItem.ContentSequence?.ReferencedSOPSequence;
  coords.ReferencedFrameOfReferenceSequence =
    graphicItem.ReferencedFrameOfReferenceUID ||
    graphicItem.ContentSequence?.ReferencedFrameOfReferenceSequence;
  return coords;
}

function _getLabelFromMeasuredValueSequence(ConceptNameCodeSequence, MeasuredValueSequence) {
  const { CodeMeaning } = ConceptNameCodeSequence;
  const { NumericValue, MeasurementUnitsCodeSequence } = MeasuredValueSequence;
  const { CodeValue } = MeasurementUnitsCodeSequence;
  const formatted = NumericValue ? Number(NumericValue).toFixed(2) : '';
  return { label: CodeMeaning, value: `${formatted} ${CodeValue}` };
}

function _getSequenceAsArray(sequence) {
  if (!sequence) return [];
  return Array.isArray(sequence) ? sequence : [sequence];
}

function isRehydratable(displaySet, mappings) {
  if (!mappings || !mappings.length) return false;
  const mappingDefinitions = new Set(mappings);
  const { measurements } = displaySet;
  for (let i = 0; i < measurements.length; i++) {
    const measurement = measurements[i];
    if (!measurement) continue;
    const { TrackingIdentifier = '', graphicType, graphicCode, pointsLength } = measurement;
    if (!TrackingIdentifier && !graphicType) {
      console.warn('No tracking identifier  or graphicType for measurement ', measurement);
      continue;
    }
    const adapter = MeasurementReport.getAdapterForTrackingIdentifier(TrackingIdentifier);
    const adapters = MeasurementReport.getAdaptersForTypes(graphicCode, graphicType, pointsLength);
    if (
      (adapter && mappingDefinitions.has(adapter.toolType)) ||
      (adapters && adapters.some((a) => mappingDefinitions.has(a.toolType)))
    ) {
      return true;
    }
    console.log('Measurement is not rehydratable', TrackingIdentifier, measurements[i]);
  }
  console.log('No measurements found which were rehydratable');
  return false;
}

// src/utils/getRenderableData.ts
function _getRenderableCoords({ GraphicData, ValueType, imageId }) {
  const renderableData = [];
  if (ValueType === 'SCOORD3D') {
    for (let i = 0; i < GraphicData.length; i += 3)
      renderableData.push([GraphicData[i], GraphicData[i + 1], GraphicData[i + 2]]);
  } else {
    for (let i = 0; i < GraphicData.length; i += 2) {
      renderableData.push(csUtils.imageToWorldCoords(imageId, [GraphicData[i], GraphicData[i + 1]]));
    }
  }
  return renderableData;
}

function getRenderableData({ GraphicType, GraphicData, ValueType, imageId }) {
  let renderableData = [];
  switch (GraphicType) {
    case SCOORDTypes.POINT:
    case SCOORDTypes.MULTIPOINT:
    case SCOORDTypes.POLYLINE:
      renderableData = _getRenderableCoords({ GraphicData, ValueType, imageId });
      break;
    case SCOORDTypes.CIRCLE: {
      const points = _getRenderableCoords({ GraphicData, ValueType, imageId });
      if (!imageId) return points;
      const [center, onPerimeter] = points;
      const radius = vec3.distance(center, onPerimeter);
      const plane = metaData.get('imagePlaneModule', imageId);
      if (!plane) throw new Error('No imagePlaneModule found');
      const { columnCosines, rowCosines } = plane;
      const top = vec3.create();
      vec3.scaleAndAdd(top, center, columnCosines, radius);
      const bottom = vec3.create();
      vec3.scaleAndAdd(bottom, center, columnCosines, -radius);
      const right = vec3.create();
      vec3.scaleAndAdd(right, center, rowCosines, radius);
      const left = vec3.create();
      vec3.scaleAndAdd(left, center, rowCosines, -radius);
      renderableData = [top, bottom, right, left];
      break;
    }
    case SCOORDTypes.ELLIPSE: {
      const points = _getRenderableCoords({ GraphicData, ValueType, imageId });
      if (!imageId) return points;
      const [a, b, c, d] = points.map((p) => vec3.fromValues(...p));
      const majorAxis = vec3.normalize(vec3.create(), vec3.sub(vec3.create(), b, a));
      const minorAxis = vec3.normalize(vec3.create(), vec3.sub(vec3.create(), d, c));
      const plane = metaData.get('imagePlaneModule', imageId);
      if (!plane) throw new Error('imageId does not have imagePlaneModule metadata');
      const columnCosines = vec3.fromValues(...plane.columnCosines);
      const majorDot = Math.abs(vec3.dot(columnCosines, majorAxis));
      const minorDot = Math.abs(Math.abs(vec3.dot(columnCosines, minorAxis)));
      renderableData = [];
      if (Math.abs(Math.abs(majorDot) - 1) < 1e-4)
        renderableData = [points[0], points[1], points[2], points[3]];
      else if (Math.abs(minorDot - 1) < 1e-4) renderableData = [points[2], points[3], points[0], points[1]];
      else console.warn('OBLIQUE ELLIPSE NOT YET SUPPORTED');
      break;
    }
    default:
      console.warn('Unsupported GraphicType:', GraphicType);
  }
  return renderableData;
}

// src/utils/addSRAnnotation.ts
function addSRAnnotation({ measurement, imageId = null, frameNumber = null, displaySet }) {
  const toolName = 'DICOMSRDisplay';
  const renderableData = measurement.coords.reduce((acc, coordProps) => {
    acc[coordProps.GraphicType] = acc[coordProps.GraphicType] || [];
    acc[coordProps.GraphicType].push(getRenderableData({ ...coordProps, imageId }));
    return acc;
  }, {});
  const { TrackingUniqueIdentifier } = measurement;
  const { ValueType: valueType, GraphicType: graphicType } = measurement.coords[0];
  const graphicTypePoints = renderableData[graphicType];
  let frameOfReferenceUID = null;
  let planeRestriction = null;
  if (imageId) {
    frameOfReferenceUID = metaData.get('imagePlaneModule', imageId)?.frameOfReferenceUID;
  }
  if (valueType === 'SCOORD3D') {
    frameOfReferenceUID = measurement.coords[0].ReferencedFrameOfReferenceSequence;
    planeRestriction = { FrameOfReferenceUID: frameOfReferenceUID, point: graphicTypePoints[0][0] };
  }
  measurement.viewReference = {
    planeRestriction,
    FrameOfReferenceUID: frameOfReferenceUID,
    referencedImageId: imageId,
  };
  csTools.annotation.state.addAnnotation({
    annotationUID: TrackingUniqueIdentifier,
    highlighted: false,
    isLocked: false,
    isPreview: true,
    invalidated: false,
    metadata: {
      toolName,
      planeRestriction,
      valueType,
      graphicType,
      FrameOfReferenceUID: frameOfReferenceUID,
      referencedImageId: imageId,
      displaySetInstanceUID: displaySet.displaySetInstanceUID,
    },
    data: {
      label: measurement.labels?.[0]?.value || undefined,
      displayText: measurement.displayText || undefined,
      handles: { textBox: measurement.textBox ?? {}, points: graphicTypePoints[0] },
      cachedStats: {},
      frameNumber,
      renderableData,
      TrackingUniqueIdentifier,
      labels: measurement.labels,
    },
  });
}

/** OHIFCornerstoneSRMeasurementViewport: after load() it opens measurement 0
 * (getViewportReferencedDisplaySetData); a measurement without a display set leaves the viewport empty. */
function getViewportReferencedDisplaySetData(srDisplaySet, measurementSelected, displaySets) {
  const { measurements } = srDisplaySet;
  const { displaySetInstanceUID } = measurements[measurementSelected];
  if (!displaySetInstanceUID) return { referencedDisplaySet: null };
  const referencedDisplaySet = displaySets.find((d) => d.displaySetInstanceUID === displaySetInstanceUID);
  if (!referencedDisplaySet?.images) return { referencedDisplaySet: null };
  return { referencedDisplaySet };
}

/** hydrateStructuredReport (the "track this report" step): up to where the adapters' tool state
 * becomes annotations; the measurement service bookkeeping after it is not copied. */
function hydrateStructuredReport(srDisplaySet) {
  const { StudyInstanceUID, SeriesInstanceUID, instance } = srDisplaySet;
  const srInstance = getInstance(StudyInstanceUID, SeriesInstanceUID, instance.SOPInstanceUID);
  const imageIdsByUIDAndFrame = {};
  srDisplaySet.measurements.forEach((measurement) => {
    const { ReferencedSOPInstanceUID, imageId, frameNumber = 1 } = measurement;
    const key = `${ReferencedSOPInstanceUID}:${frameNumber}`;
    if (imageId && !imageIdsByUIDAndFrame[key]) imageIdsByUIDAndFrame[key] = imageId;
  });
  const storedMeasurementByAnnotationType = MeasurementReport.generateToolState(
    srInstance,
    imageIdsByUIDAndFrame,
    metaData,
  );
  const annotations = [];
  Object.keys(storedMeasurementByAnnotationType)
    .filter((annotationType) => MEASUREMENT_SOURCE_ANNOTATION_TYPES.includes(annotationType))
    .forEach((annotationType) => {
      storedMeasurementByAnnotationType[annotationType].forEach((toolData) => {
        const frame = toolData.annotation.data?.frameNumber || 1;
        const imageId = imageIdsByUIDAndFrame[`${toolData.sopInstanceUid}:${frame}`];
        annotations.push({
          annotationType,
          trackingUniqueIdentifier: toolData.TrackingUniqueIdentifier ?? null,
          drawnOn: imageId ? MetadataProvider.getUIDsFromImageID(imageId).SOPInstanceUID : null,
        });
      });
    });
  return annotations;
}

async function loadSR(reportPath, sourcePaths) {
  const sources = sourcePaths.map(addInstance);
  const displaySets = sourceDisplaySets(sources);
  const result = { ok: false, error: null, measurements: [], viewport: null, hydration: null };
  let srDisplaySet;
  try {
    const report = addInstance(reportPath);
    if (!SR_SOP_CLASS_UIDS.includes(report.SOPClassUID))
      throw new Error(`not an SR SOP class: ${report.SOPClassUID}`);
    [srDisplaySet] = _getDisplaySetsFromSeries([report]);
    if (!srDisplaySet.isImagingMeasurementReport) {
      // OHIFCornerstoneSRViewport: anything else is shown as a text tree, never drawn
      throw new Error('not a TID 1500 Imaging Measurement Report (126000, DCM): OHIF shows it as text only');
    }
    _load(srDisplaySet, displaySets);
    const { referencedDisplaySet } = getViewportReferencedDisplaySetData(srDisplaySet, 0, displaySets);
    result.viewport = {
      opens: Boolean(referencedDisplaySet),
      image: referencedDisplaySet ? (srDisplaySet.measurements[0].ReferencedSOPInstanceUID ?? null) : null,
    };
    result.ok = true;
  } catch (error) {
    if (error instanceof HarnessError) throw error;
    result.error = error instanceof Error ? error.message : String(error);
    toStderr(error);
  }
  result.measurements = (srDisplaySet?.measurements ?? []).map((m) => ({
    trackingIdentifier: m.TrackingIdentifier ?? null,
    trackingUniqueIdentifier: m.TrackingUniqueIdentifier ?? null,
    labels: m.labels,
    graphicType: m.graphicType ?? null,
    loaded: m.loaded,
    drawnOn: m.ReferencedSOPInstanceUID ?? null,
  }));
  if (result.ok) {
    result.hydration = { rehydratable: srDisplaySet.isRehydratable, error: null, annotations: [] };
    if (srDisplaySet.isRehydratable) {
      try {
        result.hydration.annotations = hydrateStructuredReport(srDisplaySet);
      } catch (error) {
        result.hydration.error = error instanceof Error ? error.message : String(error);
      }
    }
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// SEG: @ohif/extension-cornerstone-dicom-seg 3.13.2, built from src/getSopClassHandlerModule.ts
// (_getDisplaySetsFromSeries, _load, _loadSegments), then @ohif/extension-cornerstone 3.13.13
// SegmentationService.createSegmentationForSEGDisplaySet up to where it hands the data to the viewport.

/** The stand-in for @cornerstonejs/dicom-image-loader's WADO-RS loader and the DICOMweb server: the
 * frame's Pixel Data as a server sends one frame (for 1-bit data the frame's bits packed from its
 * first byte) and as the loader returns it (decodeLittleEndian passes 1- and 8-bit data through). */
function registerFrameLoader() {
  const uncompressed = ['1.2.840.10008.1.2', '1.2.840.10008.1.2.1', '1.2.840.10008.1.2.1.99'];
  imageLoader.registerImageLoader('wadors', (imageId) => ({
    promise: (async () => {
      const { StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, frameNumber } =
        MetadataProvider.getUIDsFromImageID(imageId);
      const instance = getInstance(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID);
      const syntax = transferSyntaxes.get(SOPInstanceUID);
      if (!uncompressed.includes(syntax)) throw new HarnessError(`cannot decode transfer syntax ${syntax}`);
      const frameIndex = Number(frameNumber || 1) - 1;
      const samples = instance.Rows * instance.Columns * (instance.SamplesPerPixel || 1);
      const bytes = new Uint8Array(instance.PixelData[0]);
      let pixels;
      if (instance.BitsAllocated === 1) {
        pixels = new Uint8Array(Math.ceil(samples / 8));
        const start = frameIndex * samples;
        for (let k = 0; k < samples; k++) {
          const bit = start + k;
          if (bytes[bit >> 3] & (1 << (bit & 7))) pixels[k >> 3] |= 1 << (k & 7);
        }
      } else {
        const size = samples * (instance.BitsAllocated / 8);
        const frame = bytes.slice(frameIndex * size, (frameIndex + 1) * size);
        pixels = instance.BitsAllocated === 16 ? new Uint16Array(frame.buffer) : frame;
      }
      return { imageId, rows: instance.Rows, columns: instance.Columns, getPixelData: () => pixels };
    })(),
    cancelFn: undefined,
  }));
}

function _getSegDisplaySetsFromSeries(instances, displaySets) {
  sortByInstanceNumber(instances);
  const instance = instances[instances.length - 1];
  const {
    StudyInstanceUID,
    SeriesInstanceUID,
    SOPInstanceUID,
    SeriesDescription = '',
    SeriesNumber,
    SOPClassUID,
    FrameOfReferenceUID,
  } = instance;
  const displaySet = {
    Modality: 'SEG',
    loading: false,
    isReconstructable: false,
    displaySetInstanceUID: guid(),
    SeriesDescription,
    SeriesNumber,
    SOPInstanceUID,
    SeriesInstanceUID,
    StudyInstanceUID,
    SOPClassUID,
    FrameOfReferenceUID,
    referencedImages: null,
    referencedSeriesInstanceUID: null,
    referencedDisplaySetInstanceUID: null,
    isDerivedDisplaySet: true,
    isLoaded: false,
    isHydrated: false,
    segments: {},
    instance,
    instances: [instance],
  };
  const referencedSeriesSequence = instance.ReferencedSeriesSequence;
  if (!referencedSeriesSequence) {
    console.error('ReferencedSeriesSequence is missing for the SEG');
    return undefined;
  }
  const referencedSeries = referencedSeriesSequence[0] || referencedSeriesSequence;
  displaySet.referencedImages = instance.ReferencedSeriesSequence.ReferencedInstanceSequence;
  displaySet.referencedSeriesInstanceUID = referencedSeries.SeriesInstanceUID;
  const referenced = getDisplaySetsForReferences(displaySets, instance.ReferencedSeriesSequence);
  if (referenced?.length > 1) {
    console.warn(
      'Segmentation does not currently handle references to multiple series, defaulting to first series',
    );
  }
  const referencedDisplaySet = referenced[0];
  if (referencedDisplaySet) {
    displaySet.referencedDisplaySetInstanceUID = referencedDisplaySet.displaySetInstanceUID;
    displaySet.isReconstructable = referencedDisplaySet.isReconstructable;
    displaySet.FrameOfReferenceUID = referencedDisplaySet.FrameOfReferenceUID;
  }
  return [displaySet];
}

const segNumberOfFrames = (instance) => {
  const fromTag = Number(instance.NumberOfFrames);
  if (fromTag > 0) return fromTag;
  const perFrame = instance.PerFrameFunctionalGroupsSequence;
  return Array.isArray(perFrame) && perFrame.length > 0 ? perFrame.length : 1;
};

function ensureInstanceMetadata(imageId, instance) {
  if (!imageId) return;
  const { StudyInstanceUID, SeriesInstanceUID } = instance;
  const SOPInstanceUID = instance.SOPInstanceUID || instance.SopInstanceUID;
  if (StudyInstanceUID && SeriesInstanceUID && SOPInstanceUID) {
    const frame = imageId.match(/(?:&|\?)frame=(\d+)/);
    MetadataProvider.addImageIdToUIDs(imageId, {
      StudyInstanceUID,
      SeriesInstanceUID,
      SOPInstanceUID,
      frameNumber: frame ? Number(frame[1]) : 1,
    });
  }
  if (metaData.get('instance', imageId)) return;
  const stored =
    StudyInstanceUID && SeriesInstanceUID && SOPInstanceUID
      ? getInstance(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)
      : undefined;
  MetadataProvider.addCustomMetadata(imageId, 'instance', stored || instance);
}

async function _loadSegments(segDisplaySet, displaySets) {
  const { instance } = segDisplaySet;
  const frames = segNumberOfFrames(instance);
  const segImageId = getImageIdsForInstance({ instance, frame: frames > 1 ? 1 : undefined });
  if (!segImageId)
    throw new Error(
      'Could not get imageId for SEG instance (no local wadouri url and getImageIdsForInstance returned nothing).',
    );
  const referencedDisplaySet = displaySets.find(
    (d) => d.displaySetInstanceUID === segDisplaySet.referencedDisplaySetInstanceUID,
  );
  if (!referencedDisplaySet) throw new Error('referencedDisplaySet is missing for SEG');
  let referencedImageIds = referencedDisplaySet.imageIds;
  if (!referencedImageIds?.length) referencedImageIds = getImageIdsForDisplaySet(referencedDisplaySet);
  if (!referencedImageIds?.length)
    referencedImageIds = referencedDisplaySet.images?.map((image) => image.imageId);
  if (!referencedImageIds?.length) throw new Error('referencedDisplaySet has no imageIds');
  segDisplaySet.referencedImageIds = referencedImageIds;
  if (!referencedDisplaySet.imageIds?.length) referencedDisplaySet.imageIds = referencedImageIds;
  const match = segImageId.match(/(.*\/frames\/)(\d+)(.*)$/);
  const frameImageIds =
    match && frames > 1
      ? Array.from({ length: frames }, (_, k) => `${match[1]}${k + 1}${match[3] || ''}`)
      : [segImageId];
  ensureInstanceMetadata(segImageId, instance);
  frameImageIds.forEach((imageId) => ensureInstanceMetadata(imageId, instance));
  const { SOPClassUID } = segDisplaySet;
  const parserType =
    SOPClassUID === sopClass.LabelmapSegmentation
      ? 'labelmap'
      : SOPClassUID === sopClass.Segmentation
        ? 'bitmap'
        : 'labelmap';
  const results = await adaptersSEG.Cornerstone3D.Segmentation.createFromDicomSegImageId(
    referencedImageIds,
    segImageId,
    {
      metadataProvider: metaData,
      tolerance: 0.001,
      parserType,
      frameImageIds,
      concurrency: 16,
    },
  );
  let usedSegmentColours = true;
  results.segMetadata.data.forEach((segment, index) => {
    if (index === 0) return;
    segment.rgba = segment.RecommendedDisplayCIELabValue;
    if (segment.rgba) {
      segment.rgba = dcmjsData.Colors.dicomlab2RGB(segment.rgba).map((x) => Math.round(x * 255));
    } else {
      usedSegmentColours = false;
    }
  });
  if (!usedSegmentColours) {
    // OHIF says so in a notification, not on the console
    warnings.push(
      'RecommendedDisplayCIELabValue not found for one or more segments. The default color was used instead.',
    );
  }
  Object.assign(segDisplaySet, results);
}

function createSegmentationForSEGDisplaySet(segDisplaySet) {
  const { labelMapImages } = segDisplaySet;
  if (!labelMapImages || !labelMapImages.length) throw new Error('SEG reading failed');
  const images = labelMapImages.flat();
  for (const image of images) {
    const { voxelManager } = image;
    voxelManager.setScalarData(voxelManager.getScalarData());
  }
  return images;
}

async function loadSEG(segPath, sourcePaths) {
  registerFrameLoader();
  const sources = sourcePaths.map(addInstance);
  const displaySets = sourceDisplaySets(sources);
  const result = { ok: false, error: null, segments: [] };
  try {
    const seg = addInstance(segPath);
    if (![sopClass.Segmentation, sopClass.LabelmapSegmentation].includes(seg.SOPClassUID)) {
      throw new Error(`not a Segmentation SOP class: ${seg.SOPClassUID}`);
    }
    const segDisplaySets = _getSegDisplaySetsFromSeries([seg], displaySets);
    if (!segDisplaySets)
      throw new Error('ReferencedSeriesSequence is missing for the SEG: OHIF makes no display set');
    const [segDisplaySet] = segDisplaySets;
    if (!segDisplaySet.referencedDisplaySetInstanceUID) {
      throw new Error(
        'no loaded display set holds an image of the ReferencedSeriesSequence: OHIF waits for one',
      );
    }
    const referenced = displaySets.find(
      (d) => d.displaySetInstanceUID === segDisplaySet.referencedDisplaySetInstanceUID,
    );
    if (referenced.unsupported) {
      // (the harness's judgement, not an OHIF exception: the SEG overlays a viewport of this display set)
      throw new Error(`OHIF 3.13 does not display the source images' SOP class ${referenced.SOPClassUID}`);
    }
    await _loadSegments(segDisplaySet, displaySets);
    const images = createSegmentationForSEGDisplaySet(segDisplaySet);
    result.segments = segDisplaySet.segMetadata.data.slice(1).map((segment) => {
      const number = Number(segment.SegmentNumber);
      const frames = [];
      for (const image of images) {
        const scalars = image.voxelManager.getScalarData();
        let pixels = 0;
        for (let k = 0; k < scalars.length; k++) if (scalars[k] === number) pixels++;
        if (pixels) {
          const sopInstanceUID =
            metaData.get('generalImageModule', image.referencedImageId)?.sopInstanceUID ?? null;
          const existing = frames.find((f) => f.sopInstanceUID === sopInstanceUID);
          if (existing) existing.pixels += pixels;
          else frames.push({ sopInstanceUID, pixels });
        }
      }
      return { number, label: segment.SegmentLabel ?? null, frames };
    });
    result.ok = true;
  } catch (error) {
    if (error instanceof HarnessError) throw error;
    result.error = error instanceof Error ? error.message : String(error);
    toStderr(error);
  }
  return result;
}

// ---------------------------------------------------------------------------------------------

const [kind, target, ...sources] = process.argv.slice(2);
if (!['sr', 'seg'].includes(kind) || !target) {
  process.stderr.write('usage: node load.mjs sr|seg OBJECT.dcm SOURCE.dcm...\n');
  process.exit(2);
}
const result = kind === 'sr' ? await loadSR(target, sources) : await loadSEG(target, sources);
process.stdout.write(`${JSON.stringify({ ...result, warnings })}\n`);
process.exit(0);
